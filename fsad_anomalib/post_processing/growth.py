"""Grow a trained model with confirmed good parts, and set its threshold by cross-conformal prediction.

A few-shot model lacks normals; the good parts a line confirms are exactly those. Growing adds them to the model's
references (its Gaussians and memory bank: the configuration and any fine-tuned weights stay) and sets the
threshold from **out-of-sample** scores of all K + N images: the images are split into a few folds, and each fold
is scored by the model refitted without it (cross-conformal prediction, Vovk 2015). No image scores itself, and
the threshold is the conformal order statistic of those scores, so the promise stays distribution-free. Each fold
model holds a fifth fewer references than the grown one, so its scores run slightly high and the threshold errs on
the safe side (fewer false rejects than the target).

A part that the current model rejects and that lies far above the other offered parts (Tukey's far-out fence,
the upper quartile plus three inter-quartile ranges) is not added: it may be a defective part among the good ones.
It is listed in the record, for a person to look at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from fsad_anomalib.post_processing.bounds import conformal_bound, conformal_minimum
from fsad_anomalib.post_processing.evidence import Refittable, refit_copy, score_batch

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_FOLDS", "cross_fitted_scores", "far_out", "grow"]

DEFAULT_FOLDS = 5

# conformal_bound's estimator, named for out-of-sample scores that come from folds
CROSS_FITTED = {
    "split-conformal order statistic": "cross-conformal order statistic",
    "normal prediction bound": "cross-fitted normal prediction bound",
}


def far_out(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which ``scores`` lie above ``threshold`` and beyond the far-out fence of all of them (Q3 + 3 IQR).

    Needs at least 4 finite scores for quartiles; with fewer nothing is flagged.
    """
    finite = scores[torch.isfinite(scores)].double()
    if finite.numel() < 4:
        return torch.zeros_like(scores, dtype=torch.bool)
    q1, q3 = torch.quantile(finite, 0.25).item(), torch.quantile(finite, 0.75).item()
    fence = q3 + 3.0 * (q3 - q1)
    return torch.isfinite(scores) & (scores > threshold) & (scores > fence)


def cross_fitted_scores(
    images: torch.Tensor, refit: Callable[[torch.Tensor], nn.Module], folds: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and anomaly-map maxima of ``images``, each from the model ``refit`` on the other folds.

    The images are shuffled with ``seed`` and dealt into ``folds`` folds of (almost) equal size.
    """
    n = images.shape[0]
    if not 2 <= folds <= n:
        msg = f"folds must be in [2, {n}] for {n} images, got {folds}."
        raise ValueError(msg)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scores, maxima = torch.empty(n), torch.empty(n)
    for fold in range(folds):
        held = order[fold::folds]
        kept = order[torch.isin(order, held, invert=True)]
        scores[held], maxima[held] = score_batch(refit(images[kept]), images[held])
    return scores, maxima


def _refitters(
    model: LightningModule,
) -> tuple[Callable[[torch.Tensor], nn.Module], Callable[[torch.Tensor], nn.Module]]:
    """How to fit the grown model, and how to fit a fold model on the grown model's scale."""
    if isinstance(model, Refittable):
        return model.refit, lambda x: model.refit(x, rescale=False)
    return (lambda x: refit_copy(model, x)), (lambda x: refit_copy(model, x))


def grow(
    model: LightningModule,
    references: torch.Tensor,
    parts: torch.Tensor,
    scores: torch.Tensor,
    names: Sequence[str],
    false_reject_rate: float,
    folds: int = DEFAULT_FOLDS,
) -> dict[str, Any]:
    """Add the good ``parts`` (pre-processed, scored ``scores`` by the current model) to the model's references.

    The model's torch model is replaced by one fitted on ``references`` and the parts not flagged, and they become
    the post-processor's ``references``; returns the
    threshold record (``image``, ``pixel``) from the cross-fitted scores of all of them, with ``grown``: how many
    references and parts, which parts were flagged and why, the folds and the estimator.
    """
    current = float(model.post_processor.image_threshold)
    flagged = far_out(scores, current)  # no threshold yet (NaN): nothing lies above it
    added = parts[~flagged & torch.isfinite(scores)]
    everything = torch.cat([references.to(added), added])
    folds = min(folds, everything.shape[0])
    fit, fit_fold = _refitters(model)
    grown = fit(everything)
    model.model = grown.eval() if isinstance(grown, nn.Module) else grown
    fold_scores, fold_maxima = cross_fitted_scores(everything, fit_fold, folds)
    finite = fold_scores[torch.isfinite(fold_scores)]
    if finite.numel() < 2:  # never a NaN threshold
        msg = (
            f"confirm(model, images, grow=True): {finite.numel()} of the {fold_scores.numel()} images gave a finite "
            "score under the model refitted without them; at least 2 are needed for a threshold."
        )
        raise ValueError(msg)
    if finite.numel() < fold_scores.numel():
        logger.warning("Growing: %d of %d cross-fitted scores are NaN or infinite and are left out.",
                       fold_scores.numel() - finite.numel(), fold_scores.numel())  # fmt: skip
    if finite.numel() < conformal_minimum(false_reject_rate):
        logger.warning("Growing: %d images are fewer than the %d a distribution-free threshold at %.1f %% needs; "
                       "using the normal prediction bound of their scores.", finite.numel(),
                       conformal_minimum(false_reject_rate), 100 * false_reject_rate)  # fmt: skip
    image = conformal_bound(finite, false_reject_rate)  # it falls back to the prediction bound below 1/rate - 1
    record: dict[str, Any] = {
        "estimator": CROSS_FITTED[image["estimator"]],
        "image": {**image, "lowest": float(finite.min())},
        "grown": {
            "references": int(references.shape[0]),
            "added": int(added.shape[0]),
            "flagged": [
                {"part": names[i], "score": float(scores[i]), "threshold": current} for i in torch.where(flagged)[0]
            ],
            "folds": folds,
            "fence": "above the current threshold and beyond Q3 + 3 IQR of the offered parts' scores",
        },
    }
    model.post_processor.references = everything.cpu()
    finite_maxima = fold_maxima[torch.isfinite(fold_maxima)]
    if finite_maxima.numel() >= 2:
        record["pixel"] = {**conformal_bound(finite_maxima, false_reject_rate), "lowest": float(finite_maxima.min())}
    return record
