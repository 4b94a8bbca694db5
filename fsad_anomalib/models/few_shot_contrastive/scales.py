"""The fused parts' scales: each part's level and spread on normal evidence its fit did not see."""

from __future__ import annotations

import itertools
import logging
import math

import torch
from torch import nn

from fsad_anomalib.data.views import Views
from fsad_anomalib.models.components.held_out import Fold, folds_for, fuse, part_scores, standardisation

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_IMAGES_DEPLOYED_SCALES",
    "MIN_IMAGES_LOCAL_ALONE",
    "held_out_scales",
    "local_alone",
    "score_floors",
    "stepped_scales",
    "two_out_level",
]

# a local part alone is standardised from this many images on, where its held-out evidence is other images (one
# image would hold out its own flips and turns, evidence of another kind); a refit on fewer keeps the deployed
# model's standardisation (FewShotContrastive.refit)
MIN_IMAGES_LOCAL_ALONE = 2
# a refit on this many images or more (the threshold's refits from K = 5) keeps the deployed model's scales: the
# deployed scales come from the same leave-one-out fits that give the refits' held-out scores, while a refit's own come
# from fits on one image fewer (noisy: a support set without one odd image gave held-out scores so tight that its
# threshold rejected a quarter of good parts). On 2-3 images a refit standardises itself: from 3 to 4 references the
# held-out level falls too far for the deployed scales to hold: there the local part alone takes the deployed scales
# with its level stepped (stepped_scales), other parts standardise themselves
MIN_IMAGES_DEPLOYED_SCALES = 4


def local_alone(model: nn.Module) -> bool:
    """Whether the score is the local part alone, on one scale (the default below five images)."""
    return model.fusion == "local" and not model.two_scales


def score_floors(model: nn.Module) -> tuple[float, float]:
    """The lowest image score and anomaly-map value the fitted model can give: every part at distance 0.

    Each part is a distance (0 at best) standardised as ``(distance - shift) / scale``; the map is the local part
    (two scales averaged), the image score fuses it with the global part as the model does.
    """
    floors = -model.score_shift / model.score_scale
    local = floors[1] if not model.two_scales else 0.5 * (floors[1] + floors[2])
    return float(fuse(floors[0], local, model.fusion)), float(local)


def two_out_level(
    model: nn.Module,
    per_view: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
    views: Views,
    max_patches: int,
) -> float:
    """The local part's mean score on held-out normals of fits on K - 2 of the K images.

    Every pair of images is left out in turn and both are scored (all their views) by the fit on the others: the
    level one step below the deployed model's held-out shift (fits on K - 1). ``per_view``: the K images' features,
    view by view, as :meth:`FewShotContrastiveModel.fit` computes them (K >= 3).
    """
    patch = torch.stack([part for part, _, _ in per_view])  # (V, K, C, h, w)
    emb = torch.stack([part for _, _, part in per_view])
    n_views, k = patch.shape[:2]
    folds = []
    for pair in itertools.combinations(range(k), 2):
        fit, query = torch.zeros(n_views, k, dtype=torch.bool), torch.zeros(n_views, k, dtype=torch.bool)
        fit[: views.n] = True
        fit[:, list(pair)], query[:, list(pair)] = False, True
        folds.append(Fold(fit, query))
    options = {"topk_ratio": model.topk_ratio, "coreset_ratio": model.coreset_ratio, "max_patches": max_patches}
    mode = model.local_mode
    scores = part_scores(folds, patch, emb, local_modes=(mode,), with_global=False, **options)["normal"][mode]
    return float(scores.mean())


def stepped_scales(deployed: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift and scale of a refit on ``n`` of the deployed model's K = n + 1 images, its level stepped to K images.

    The refit's local part alone goes on the deployed scale, its level moved to that of a fit on K images.

    The held-out level L(m) of a fit on m images falls with m; taken as a power law, L(K) / L(K - 1) =
    (L(K - 1) / L(K - 2)) ** (log(K / (K - 1)) / log((K - 1) / (K - 2)))), from the deployed model's held-out shift
    (fits on K - 1) and :func:`two_out_level` (fits on K - 2). The refit's score is then ``(raw * step - shift) /
    scale`` with the deployed shift and scale: its held-out scores read as a new image's under the deployed model.
    A level that does not fall gives no step.
    """
    shift_, scale = deployed.score_shift.clone(), deployed.score_scale.clone()
    k = n + 1
    exponent = math.log(k / n) / math.log(n / (n - 1))
    step = min(1.0, float(shift_[1]) / deployed.two_out_level) ** exponent
    shift_[1], scale[1] = shift_[1] / step, scale[1] / step
    return shift_, scale


def held_out_scales(
    model: nn.Module,
    images: torch.Tensor,
    per_view: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
    views: Views,
    batch_size: int,
    max_patches: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each part's mean and standard deviation on normal evidence its fit did not see, where parts are fused.

    A normal image scores low against a model fitted on itself, and the parts unevenly so (a memory bank
    scores its own patches 0). Each of the K images (all its views) is held out in turn, the parts are fitted on
    the others and the held-out views are scored; with K = 1 the fit keeps the first view and each other view
    the symmetries allow is held out. Standardising by the spread as well as the level keeps a part whose
    normals vary a lot from raising false alarms on its own. From ``MIN_IMAGES_LOCAL_ALONE`` images the local part
    is standardised even alone: a refit on fewer images (the threshold's held-out evidence) then scores on its own
    held-out level, not above the deployed model's. Otherwise a part alone keeps shift 0 and scale 1.
    """
    shift_ = torch.zeros(3, device=model.score_scale.device)
    scale = torch.ones(3, device=model.score_scale.device)
    k, total = images.shape[0], views.held_out(images)
    alone = model.fusion == "local" and not model.two_scales
    if model.fusion == "global" or (alone and k < MIN_IMAGES_LOCAL_ALONE):
        return shift_, scale
    if k >= 2:
        stacked = [torch.stack(part) if part[0] is not None else None for part in zip(*per_view, strict=True)]
    elif total < 2:
        logger.warning(
            "FewShotContrastive: one image, one view and no flip or turn allowed leave no normal "
            "evidence to hold out; each part is divided by its score on the training image, or by "
            "1 where that is 0 (one embedding, a memory bank of its own patches)."
        )
        values = torch.stack([part.mean() for part in model.raw_part_scores(images)]).to(scale)
        return shift_, torch.where(values > 1e-3, values, torch.ones_like(values))
    else:
        every = model.batched_parts(torch.cat(list(views.of(images, total))), batch_size)
        stacked = [part[:, None] if part is not None else None for part in every]
    normal_patch, normal_fine, normal_global = stacked
    folds = folds_for(total, k, views.n)
    options = {"topk_ratio": model.topk_ratio, "coreset_ratio": model.coreset_ratio, "max_patches": max_patches}
    mode = model.local_mode
    scores = part_scores(folds, normal_patch, normal_global, local_modes=(mode,), with_global=not alone, **options)
    local = scores["normal"][mode]
    shift_[:2], scale[:2] = standardisation(scores["normal"].get("global", local), local)
    if alone:  # the global part is not scored: it keeps shift 0 and scale 1, as the record and buffers say
        shift_[0], scale[0] = 0.0, 1.0
    if normal_fine is not None:
        options["with_global"] = False
        fine = part_scores(folds, normal_fine, normal_global, local_modes=("patch",), **options)["normal"]["patch"]
        shift_[2], scale[2] = (value[1] for value in standardisation(fine, fine))
    return shift_, scale
