"""Self-configuration of FewShotContrastive, from the K normal images alone.

The model has no defective image to choose with. It makes synthetic ones from the normals (local flaws and
whole-image shifts, :mod:`fsad_anomalib.fine_tuning.shifts`) and judges each candidate configuration by how well
it separates held-out normals from them (:func:`self_check`). Here live the candidates, the self-check, the choice
(:func:`best`), the fine-tuning decision (:func:`decide_fine_tuning`) and their constants; :func:`configure` runs
them in order for :meth:`FewShotContrastive.fit`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from fsad_anomalib.data.views import Views
from fsad_anomalib.fine_tuning import ContrastiveFineTuning
from fsad_anomalib.fine_tuning.shifts import GLOBAL_FAMILIES, LOCAL_FAMILIES, SHIFT_FAMILIES, shift
from fsad_anomalib.models.components.held_out import LOCAL_MODES, auroc, folds_for, fuse, part_scores, standardisation

logger = logging.getLogger(__name__)

__all__ = ["SCORE_MODES", "best", "candidates_for", "configure", "decide_fine_tuning", "self_check", "write_record"]

SCORE_MODES = ("auto", "combined", "patch", "global", "knn", "knn_patch", "subspace")
# an explicit score_mode is one (local scoring, fusion) pair
MODE_PARTS = {
    "patch": ("patch", "local"),
    "knn": ("knn", "local"),
    "knn_patch": ("knn_patch", "local"),
    "subspace": ("subspace", "local"),
    "global": ("patch", "global"),
    "combined": ("patch", "mean"),
}
# what "auto" chooses among: every local scoring, the first (the prior) kept unless another is clearly better, each
# fused with the global score by the larger of the two standardised parts ("max"), or alone ("local")
AUTO_LOCAL = ("knn_patch", "patch", "knn")
AUTO_FUSIONS = ("max", "local")
# "auto" fuses the global part from this many images on. Its standardisation comes from leave-one-out (a Gaussian on
# K - 1 embeddings), and the threshold's held-out evidence from refits on K - 1 images that standardise themselves
# the same way (K - 2 embeddings): with fewer than 3, the Gaussian is degenerate (Ledoit-Wolf shrinks nothing at 2)
# and its held-out level says nothing about the deployed model's
MIN_IMAGES_FOR_GLOBAL = 5
# a candidate replaces the prior (the first) only when its objective is higher by more than this: the objective
# rests on a few normals and synthetic anomalies, and a small lead is noise
SELECTION_MARGIN = 0.02
# fine-tuning is kept when it raises the self-check objective on held-out images by more than this
FINE_TUNING_MARGIN = 0.005
# synthetic anomalies per held-out fold and family, so that a self-check has about this many per family in all
ANOMALIES_PER_FAMILY = 8
# the synthetic families a fine-tuning synthesis trains on, which therefore cannot judge it
TRAINED_FAMILIES = {"cutpaste": (), "speck": ("speck",), "none": ()}

Candidate = tuple[str, str]  # (local scoring, fusion)


def candidates_for(score_mode: str) -> list[Candidate]:
    """The (local scoring, fusion) pairs ``score_mode`` allows; ``"auto"`` lists them all, the prior first."""
    if score_mode not in SCORE_MODES:
        msg = f"score_mode must be one of {SCORE_MODES}, got '{score_mode}'."
        raise ValueError(msg)
    if score_mode == "auto":
        return list(itertools.product(AUTO_LOCAL, AUTO_FUSIONS))
    return [MODE_PARTS[score_mode]]


def untrained_families(fine_tuning: ContrastiveFineTuning | None) -> list[str]:
    """The synthetic families that ``fine_tuning``'s synthesis does not train on (those that can judge it)."""
    synthesis = str(fine_tuning.hparams.get("synthesis", "cutpaste")) if fine_tuning is not None else "none"
    trained = TRAINED_FAMILIES.get(synthesis, ())
    return [family for family in SHIFT_FAMILIES if family not in trained]


@torch.no_grad()
def self_check(
    model: torch.nn.Module,
    images: torch.Tensor,
    views: Views,
    candidates: Sequence[Candidate],
    families: Sequence[str] = SHIFT_FAMILIES,
    seed: int = 0,
    batch_size: int = 32,
    max_patches: int = 200_000,
) -> list[dict[str, Any]] | None:
    """How well each candidate separates held-out normals from synthetic anomalies made of them.

    With K >= 2 each image (past ``MAX_FOLDS`` images, each group of images) is held out in turn: the Gaussians
    and memory bank are fitted on the fit's views of the
    others, as ``model.fit`` fits them, and the held-out image's views are scored beside synthetic anomalies made
    from them, ``ceil(8 / folds)`` per family. With K = 1 the fit keeps the image's first view and each other view
    the symmetries allow is held out. Both parts are standardised by their held-out normal mean and deviation.
    The objective is the mean of the AUROC over the local families and over the global ones, so that neither kind
    of defect is traded away for the other.

    Returns:
        One row per candidate, in the given order: ``layers``, ``local``, ``fusion``, ``candidate``, ``score`` (the
        objective), ``local_auroc``, ``global_auroc`` and ``families`` (each family's AUROC). ``None`` when one
        image with no flip or turn leaves nothing to hold out.
    """
    unknown = [family for family in families if family not in SHIFT_FAMILIES]
    if unknown or not families:
        msg = f"self_check: families must be a non-empty subset of {SHIFT_FAMILIES}, got {list(families)}."
        raise ValueError(msg)
    k = images.shape[0]
    total = views.held_out(images)
    if k == 1 and total < 2:
        return None
    normal_views = list(views.of(images, total))  # V x (K, 3, H, W)
    folds = folds_for(total, k, views.n)
    draws = max(1, math.ceil(ANOMALIES_PER_FAMILY / len(folds)))
    generator = torch.Generator().manual_seed(seed)
    sources, labels = [], []
    for index, fold in enumerate(folds):
        # a fold's anomalies are made from the views it holds out, in turn, so that they come in the same views as
        # the held-out normals they are ranked against: its images' views (K >= 2), or the one view (K = 1)
        if k >= 2:
            group = fold.query.any(0).nonzero().flatten().tolist()
            held = [view[i : i + 1] for i in group for view in normal_views]
        else:
            held = [normal_views[index + 1]]
        for turn, (family, _) in enumerate(itertools.product(families, range(draws))):
            fold.anomalies.append(len(sources))
            sources.append(shift(held[(turn + index) % len(held)].cpu(), family, generator).to(images.device))
            labels.append(family)
    was_training = model.training
    model.eval()
    normal_patch, normal_global = _features(model, torch.cat(normal_views), batch_size)
    anomaly_patch, anomaly_global = _features(model, torch.cat(sources), batch_size)
    model.train(was_training)
    locals_ = sorted({local for local, _ in candidates}, key=LOCAL_MODES.index)
    scores = part_scores(
        folds,
        normal_patch.view(total, k, *normal_patch.shape[1:]),
        normal_global.view(total, k, -1),
        anomaly_patch,
        anomaly_global,
        local_modes=locals_,
        topk_ratio=model.topk_ratio,
        coreset_ratio=model.coreset_ratio,
        max_patches=max_patches,
    )
    normal, anomaly = scores["normal"], scores["anomaly"]
    rows = []
    for local, fusion in candidates:
        shift_, scale = standardisation(normal["global"], normal[local])
        if fusion in {"local", "global"}:
            shift_, scale = torch.zeros_like(shift_), torch.ones_like(scale)
        fused = [
            fuse((part["global"] - shift_[0]) / scale[0], (part[local] - shift_[1]) / scale[1], fusion)
            for part in (normal, anomaly)
        ]
        per_family = {}
        for family in families:
            chosen = torch.tensor([label == family for label in labels], device=fused[1].device)
            per_family[family] = auroc(fused[0], fused[1][chosen])
        groups = [[per_family[f] for f in families if f in group] for group in (LOCAL_FAMILIES, GLOBAL_FAMILIES)]
        means = [sum(group) / len(group) if group else None for group in groups]
        present = [mean for mean in means if mean is not None]
        rows.append({
            "layers": list(model.layers),
            "local": local,
            "fusion": fusion,
            "candidate": (local, fusion),
            "score": sum(present) / len(present),
            "local_auroc": means[0],
            "global_auroc": means[1],
            "families": per_family,
        })
    return rows


def _features(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [model.features(images[start : start + batch_size]) for start in range(0, images.shape[0], batch_size)]
    return torch.cat([patch for patch, _ in parts]), torch.cat([emb for _, emb in parts])


def best(rows: Sequence[dict[str, Any]], margin: float = SELECTION_MARGIN) -> dict[str, Any]:
    """The choice among :func:`self_check`'s rows.

    The first (the prior) unless the row with the highest ``score``
    (the first of equals) beats it by more than ``margin``. Deterministic.
    """
    prior, challenger = rows[0], rows[0]
    for row in rows[1:]:
        if row["score"] > challenger["score"]:
            challenger = row
    return challenger if challenger["score"] > prior["score"] + margin else prior


def select(model: torch.nn.Module, images: torch.Tensor, views: Views, seed: int, families: Sequence[str]) -> dict:
    """Configure ``model`` with the candidate that best separates held-out normals from synthetic anomalies."""
    candidates = candidates_for(model.score_mode)
    if model.score_mode == "auto":  # the global part from MIN_IMAGES_FOR_GLOBAL images on, the local one below
        with_global = len(images) >= MIN_IMAGES_FOR_GLOBAL
        candidates = [c for c in candidates if (c[1] == "local") != with_global]
        if not with_global:
            logger.info(
                "FewShotContrastive: K = %d: the global part needs %d images (the threshold's leave-one-out refits "
                "then standardise a Gaussian fitted on %d embeddings); the local score is used alone.",
                len(images),
                MIN_IMAGES_FOR_GLOBAL,
                MIN_IMAGES_FOR_GLOBAL - 2,
            )
    if len(candidates) == 1:
        model.configure(*candidates[0])
        return {"candidates": 1, "reason": "layers and score_mode are given: nothing to choose"}
    rows = self_check(model, images, views, candidates, families=families, seed=seed)
    if rows is None:
        model.configure(*candidates[0])
        logger.warning(
            "FewShotContrastive: one image and no flip or turn allowed leave nothing to hold out; "
            "self-configuration keeps %s.",
            model.describe(),
        )
        return {"candidates": len(candidates), "reason": "one image, one view: nothing to hold out"}
    chosen = best(rows)
    model.configure(*chosen["candidate"])
    logger.info(
        "FewShotContrastive self-configuration (K = %d): %s (self-check %.3f; local %.3f, global %.3f) among "
        "%d candidates",
        len(images),
        model.describe(),
        chosen["score"],
        chosen["local_auroc"],
        chosen["global_auroc"],
        len(rows),
    )
    return {"candidates": len(rows), "table": [{k: v for k, v in row.items() if k != "candidate"} for row in rows]}


def decide_fine_tuning(module: LightningModule, images: torch.Tensor, trainer: Trainer | None) -> dict[str, Any]:
    """``fine_tuning="auto"``: fine-tune on the first half of the images and judge it on the second half.

    The chosen configuration's self-check on the held-out half (on the families the synthesis does not train on)
    is compared with the frozen backbone's. The fine-tuned weights are kept (the very weights judged: one
    fine-tuning run, whatever K) only if they gain more than ``FINE_TUNING_MARGIN``; otherwise the frozen weights
    stay. The Gaussians and memory bank are then fitted on all K images either way.
    """
    model, callback, k = module.model, module.fine_tuning, len(images)
    if k < 2:
        logger.info("FewShotContrastive: K = 1 leaves no image to judge fine-tuning on; the backbone stays frozen.")
        return {"fine_tuned": False, "reason": "K = 1: no held-out image to judge fine-tuning on"}
    families = untrained_families(callback)
    split = math.ceil(k / 2)
    frozen = {name: value.detach().clone() for name, value in model.feature_extractor.state_dict().items()}
    check = {"views": module.views, "candidates": [model.current], "families": families, "seed": module.seed}
    before = self_check(model, images[split:], **check)
    with torch.enable_grad():
        callback.fine_tune(module, images[:split], trainer)
    after = self_check(model, images[split:], **check)
    if before is None or after is None:
        model.feature_extractor.load_state_dict(frozen)
        logger.info("FewShotContrastive: nothing to judge fine-tuning on; the backbone stays frozen.")
        return {"fine_tuned": False, "reason": "no held-out evidence"}
    frozen_score, tuned_score = before[0]["score"], after[0]["score"]
    keep = tuned_score > frozen_score + FINE_TUNING_MARGIN
    if keep:  # the weights that were judged are the weights kept: no second, unjudged run on all K images
        logger.info(
            "FewShotContrastive: fine-tuning on %d images raises the self-check on the other %d from %.3f to %.3f; "
            "its weights are kept.",
            split,
            k - split,
            frozen_score,
            tuned_score,
        )
    else:
        model.feature_extractor.load_state_dict(frozen)
        logger.info(
            "FewShotContrastive: fine-tuning does not improve the self-check on held-out images (%.3f frozen, "
            "%.3f fine-tuned): it is skipped and the backbone stays frozen.",
            frozen_score,
            tuned_score,
        )
    return {
        "fine_tuned": keep,
        "frozen_score": frozen_score,
        "fine_tuned_score": tuned_score,
        "tuned_on": split,
        "judged_on": k - split,
        "families": families,
    }


def configure(module: LightningModule, images: torch.Tensor, trainer: Trainer | None) -> dict[str, Any]:
    """Choose the scoring, then fine-tune (``"auto"``: only where it helps): the record of what was chosen and why."""
    callback = module.fine_tuning
    record: dict[str, Any] = {"k_shot": len(images), "seed": module.seed}
    # with explicit fine-tuning, select on the families it does not train on
    families = untrained_families(callback) if callback is not None and not module.auto_fine_tuning else SHIFT_FAMILIES
    record["selection"] = select(module.model, images, module.views, module.seed, families)
    fine_tuned = callback is not None
    if module.auto_fine_tuning:
        record["fine_tuning"] = decide_fine_tuning(module, images, trainer)
        fine_tuned = record["fine_tuning"]["fine_tuned"]
    elif callback is not None:
        with torch.enable_grad():
            callback.fine_tune(module, images, trainer)
    record["chosen"] = {**module.model.describe(), "fine_tuned": fine_tuned}
    return record


def write_record(record: dict[str, Any], trainer: Trainer | None) -> None:
    """``self_configuration.json`` beside the run's results (the trainer's ``default_root_dir``)."""
    if trainer is None or not trainer.is_global_zero:
        return
    path = Path(trainer.default_root_dir) / "self_configuration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n", encoding="utf-8")
