"""What a run's OK/NG threshold does on the test set: its rates, anomalib's oracle F1 threshold, confirmation."""

from __future__ import annotations

import math
from typing import Any

import torch
from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold
from torch.utils.data import DataLoader

from fsad_anomalib.confirm import confirm
from fsad_anomalib.data import FewShot
from fsad_anomalib.data.few_shot import sample_support_set
from fsad_anomalib.post_processing import NormalThresholdPostProcessor

__all__ = [
    "RECORDED_RATES",
    "confirmation_record",
    "decision_rates",
    "growth_record",
    "oracle_f1_threshold",
    "threshold_record",
]


def decision_rates(scores: list[float], labels: list[int], threshold: float) -> dict[str, float]:
    """False-reject and detection rates of ``score > threshold``.

    On the normals (label 0) and the anomalies (label 1): the decision anomalib's post-processor makes; NaN where the
    threshold or a class is missing.
    """
    normal = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    anomalous = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    finite = threshold is not None and math.isfinite(threshold)

    def rate(values: list[float]) -> float:
        return sum(v > threshold for v in values) / len(values) if finite and values else float("nan")

    return {"false_reject_rate": rate(normal), "detection_rate": rate(anomalous)}


def oracle_f1_threshold(scores: list[float], labels: list[int]) -> float:
    """Anomalib's F1-adaptive threshold learned on these (test) scores and labels: the best F1 they allow."""
    pairs = [(s, y) for s, y in zip(scores, labels, strict=True) if y in {0, 1} and math.isfinite(s)]
    if not pairs or len({y for _, y in pairs}) < 2:
        return float("nan")
    metric = _F1AdaptiveThreshold()
    metric.update(torch.tensor([s for s, _ in pairs], dtype=torch.float64), torch.tensor([y for _, y in pairs]))
    return float(metric.compute())


# besides the run's own target, every run records what the same held-out evidence gives at these targets
RECORDED_RATES = (0.01, 0.05)


def _rates_at(post_processor: Any, scores: list, labels: list, target: float, threshold: float) -> dict[str, Any]:  # noqa: ANN401
    """Threshold and rates at each recorded target rate.

    At each of ``RECORDED_RATES`` (from the calibration's evidence) and at ``target`` (``threshold``).
    """
    at = {}
    for rate in sorted({*RECORDED_RATES, target}):
        try:
            value = float(post_processor.threshold_at(rate)) if rate != target else threshold
        except (AttributeError, ValueError):
            value = float("nan")
        at[f"{rate:g}"] = {"threshold": value, **decision_rates(scores, labels, value)}
    return at


def threshold_record(post_processor: Any, target: float) -> dict[str, Any]:  # noqa: ANN401
    """What a run's normal-only threshold does on the test set, beside anomalib's oracle F1 threshold.

    ``at`` holds the threshold and the two rates at each of ``RECORDED_RATES`` and ``target``, all from the same
    held-out evidence (:meth:`NormalThresholdPostProcessor.threshold_at`), so one run measures several targets.
    """
    scores = list(getattr(post_processor, "raw_scores", []))
    labels = list(getattr(post_processor, "gt_labels", []))
    threshold = float(post_processor._image_threshold) if post_processor is not None else float("nan")  # noqa: SLF001
    oracle = oracle_f1_threshold(scores, labels)
    own, best = decision_rates(scores, labels, threshold), decision_rates(scores, labels, oracle)
    at = _rates_at(post_processor, scores, labels, target, threshold)
    return {
        "target_false_reject_rate": target,
        "threshold": threshold,
        "false_reject_rate": own["false_reject_rate"],
        "detection_rate": own["detection_rate"],
        "oracle_threshold": oracle,
        "oracle_false_reject_rate": best["false_reject_rate"],
        "oracle_detection_rate": best["detection_rate"],
        "at": at,
    }


def confirmation_images(few_shot: FewShot, n: int, seed: int) -> Any:  # noqa: ANN401
    """A dataloader of ``n`` normals of the training pool outside the support set, drawn with ``seed``."""
    full = few_shot.datamodule.train_data
    support = set(few_shot.support_set)
    spare = [path for path in few_shot.pool(full) if path not in support]
    if n > len(spare):
        msg = f"--confirm {n}: the training pool holds {len(spare)} normals outside the support set."
        raise ValueError(msg)
    # a stream of its own, so that the draw does not depend on what the support set's draw consumed
    chosen = set(sample_support_set(spare, n, seed + 10_000))
    paths = full.samples.image_path.astype(str)
    subset = full.subsample([i for i, path in enumerate(paths) if path in chosen])
    return DataLoader(subset, batch_size=32, shuffle=False, collate_fn=subset.collate_fn)


def confirmation_record(model: Any, few_shot: FewShot, n: int, seed: int, target: float) -> dict[str, Any]:  # noqa: ANN401
    """The threshold confirmed on ``n`` further pool normals, and its rates on the test scores the run recorded."""
    post = model.post_processor
    if not isinstance(post, NormalThresholdPostProcessor):
        return {"n": n, "error": f"{type(post).__name__} sets no threshold from normals to confirm"}
    scores, labels = list(post.raw_scores), list(post.gt_labels)
    record = confirm(model, confirmation_images(few_shot, n, seed), false_reject_rate=target)
    at = _rates_at(post, scores, labels, target, float(post.threshold_at(target)))
    return {"n": n, "estimator": record["estimator"], "at": at}


def growth_record(model: Any, few_shot: FewShot, engine: Any, n: int, seed: int, target: float) -> dict[str, Any]:  # noqa: ANN401
    """The model grown by the ``n`` pool normals of :func:`confirmation_record`, tested again on the test set.

    Its image AUROC, the rates of its cross-conformal threshold (and at the recorded targets) on the new test scores,
    and what growing added and flagged.
    """
    post = model.post_processor
    if not isinstance(post, NormalThresholdPostProcessor):
        return {"n": n, "error": f"{type(post).__name__} sets no threshold from normals to grow"}
    record = confirm(model, confirmation_images(few_shot, n, seed), false_reject_rate=target, grow=True)
    post.raw_scores, post.gt_labels = [], []  # the grown model's test scores only
    metrics = engine.test(model=model, datamodule=few_shot, verbose=False)[0]
    scores, labels = list(post.raw_scores), list(post.gt_labels)
    grown = record["grown"]
    return {
        "n": n,
        "added": grown["added"],
        "flagged": len(grown["flagged"]),
        "folds": grown["folds"],
        "estimator": record["estimator"],
        "image_AUROC": float(metrics.get("image_AUROC", float("nan"))),
        "at": _rates_at(post, scores, labels, target, float(post.threshold_at(target))),
    }
