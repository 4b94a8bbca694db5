"""The statistics of a threshold from good parts alone: prediction bound, conformal bound and their rate checks.

:class:`~fsad_anomalib.post_processing.NormalThresholdPostProcessor` sets its thresholds with them, confirmation
(:mod:`fsad_anomalib.confirm`) resets them, and the benchmark reads the same thresholds at other rates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from scipy import stats

__all__ = ["bound_at", "check_rate", "conformal_bound", "conformal_minimum", "prediction_bound"]


def transform_of(scores: torch.Tensor) -> str:
    """``log`` where all ``scores`` are positive (distances, skewed to the right), else ``identity``."""
    return "log" if bool((scores > 0).all()) else "identity"


def _transformed(scores: torch.Tensor, transform: str) -> torch.Tensor:
    values = scores.detach().double().flatten().cpu()
    return values.log() if transform == "log" else values


def prediction_bound(
    scores: torch.Tensor, false_reject_rate: float, n_effective: int | None = None, floor: float | None = None
) -> dict[str, Any]:
    """The one-sided normal prediction bound of ``scores`` at ``false_reject_rate``.

    Args:
        scores (torch.Tensor): Held-out normal scores (1-D, finite).
        false_reject_rate (float): The target probability that a new normal score lies above the bound.
        n_effective (int | None): The number of independent samples behind ``scores`` (the images, where several
            views of one image were scored); defaults to ``scores.numel()``.
        floor (float | None): The lowest score the model can give (a standardised distance's value at distance 0),
            where it has one: the bound is then computed on the scores' distance above it, as on raw distances.

    Returns:
        dict[str, Any]: ``threshold`` (float) and what it was computed from: ``transform`` (``log`` where all
        scores lie above ``floor`` (default 0), else ``identity``), ``floor``, ``mean`` and ``std`` in that space,
        ``n``, ``t``.
    """
    values = scores.detach().double().flatten().cpu()
    n = int(n_effective or values.numel())
    if values.numel() < 2 or n < 2:
        msg = f"a prediction bound needs at least 2 held-out scores from 2 samples, got {values.numel()} from {n}."
        raise ValueError(msg)
    offset = float(floor) if floor is not None and bool((values > floor).all()) else 0.0
    transform = transform_of(values - offset)
    x = _transformed(values - offset, transform)
    mean, std = float(x.mean()), float(x.std())
    # scores that agree to the last digits would give a bound at the mean: keep a floor of 1 % of the level
    std = max(std, 0.01 * max(abs(mean), 1e-12)) if transform == "identity" else max(std, 1e-3)
    t = float(stats.t.ppf(1.0 - false_reject_rate, df=n - 1))
    threshold = _bound_value(mean, std, n, t, transform) + offset
    return {"threshold": threshold, "transform": transform, "floor": offset, "mean": mean, "std": std, "n": n, "t": t}


def _bound_value(mean: float, std: float, n: int, t: float, transform: str) -> float:
    bound = mean + t * std * math.sqrt(1.0 + 1.0 / n)
    return math.exp(bound) if transform == "log" else bound


def conformal_bound(scores: torch.Tensor, false_reject_rate: float) -> dict[str, Any]:
    """The split-conformal threshold of the scores of N good parts the model never saw, at ``false_reject_rate``.

    With ``N >= 1 / rate - 1`` scores it is the ``ceil((N + 1) (1 - rate))``-th smallest: a new good part, exchangeable
    with these, scores above it with probability at most ``rate`` (and more than ``rate - 1 / (N + 1)``), for any
    distribution. With fewer the order statistic does not exist and the normal prediction bound of the scores is
    used instead, never below the largest score (the order statistic at rate 1 / (N + 1)): a stricter rate never
    gives a lower threshold. The record keeps the scores, so :func:`bound_at` can move to another rate.
    """
    values = scores.detach().double().flatten().cpu()
    n = values.numel()
    if n < conformal_minimum(false_reject_rate):
        record = prediction_bound(values, false_reject_rate)
        record["threshold"] = max(record["threshold"], float(values.max()))
        return {**record, "estimator": "normal prediction bound", "scores": values.tolist()}
    rank = math.ceil((n + 1) * (1.0 - false_reject_rate) - 1e-9)  # <= n from conformal_minimum parts on
    threshold = float(values.sort().values[rank - 1])
    return {
        "threshold": threshold,
        "estimator": "split-conformal order statistic",
        "n": n,
        "rank": rank,
        "scores": values.tolist(),
    }


def conformal_minimum(false_reject_rate: float) -> int:
    """How many good parts :func:`conformal_bound` needs for its distribution-free order statistic at this rate."""
    return math.ceil(1.0 / false_reject_rate - 1.0 - 1e-9)


def bound_at(record: dict[str, Any], false_reject_rate: float) -> float:
    """The threshold a bound's ``record`` gives at another ``false_reject_rate``.

    A :func:`prediction_bound` or :func:`conformal_bound` record, on the same evidence.
    """
    if "scores" in record:  # confirmed on good parts: the same estimator, at the other rate
        scores = torch.tensor(record["scores"], dtype=torch.float64)
        return float(conformal_bound(scores, false_reject_rate)["threshold"])
    t = float(stats.t.ppf(1.0 - false_reject_rate, df=int(record["n"]) - 1))
    value = _bound_value(float(record["mean"]), float(record["std"]), int(record["n"]), t, str(record["transform"]))
    return value + float(record.get("floor", 0.0))


def check_rate(false_reject_rate: Any) -> None:  # noqa: ANN401
    """Refuse a false-reject rate that is not a number in (0, 0.5), naming the argument and what it expects."""
    if (
        isinstance(false_reject_rate, bool)
        or not isinstance(false_reject_rate, (int, float))
        or not (0.0 < float(false_reject_rate) < 0.5)
    ):
        msg = (
            f"false_reject_rate must be a number in (0, 0.5), e.g. 0.05 for 5 % of good parts, got "
            f"{false_reject_rate!r}."
        )
        raise ValueError(msg)
