"""One CSV row per predicted image (path, raw score, normalised score, OK/NG label, threshold), beside the overlays.

anomalib's ``predict`` writes overlay images and no per-image record, and has no file convention of its own for one, so
this is plain CSV: ``predictions.csv`` in the run's folder (the trainer's ``default_root_dir``, where anomalib's
visualizer writes ``images/``). On the line the label is the product.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "PredictionTable"]

COLUMNS = ("image_path", "raw_score", "score", "label", "threshold", "raw_threshold")


def _values(tensor: torch.Tensor | None, n: int) -> list[float | None]:
    if tensor is None:
        return [None] * n
    flat = tensor.detach().float().flatten().cpu()
    return [float(v) for v in flat] if flat.numel() == n else [None] * n


class PredictionTable(Callback):
    """Write ``predictions.csv``: a row per image that ``trainer.predict`` scores.

    Columns: ``image_path``; ``raw_score`` (the model's score before post-processing); ``score`` (the normalised score
    anomalib reports, 0.5 at the threshold); ``label`` (``NG`` above the threshold, ``OK`` otherwise, empty where no
    threshold was set); ``threshold`` (on the reported score: 0.5 unless the post-processor's sensitivity moves it)
    and ``raw_threshold`` (on the raw score).

    Put it before the post-processor in the callback list: it reads each batch's raw scores before the post-processor
    normalises them in place, and writes the batch's row once the batch has been post-processed.
    """

    def __init__(self, file_name: str = "predictions.csv") -> None:
        super().__init__()
        self.file_name = file_name
        self.path: Path | None = None
        self._pending: tuple[Any, list[float | None]] | None = None
        self._rows = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new file in the run's folder."""
        del pl_module
        self.path = Path(trainer.default_root_dir) / self.file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            csv.writer(handle).writerow(COLUMNS)
        self._pending, self._rows = None, 0

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401 - Lightning's hook signature
        *args: Any,  # noqa: ANN401
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        """Keep the raw scores of this batch; write the previous one (post-processed by now)."""
        del trainer, args, kwargs
        self._flush(pl_module)
        scores = getattr(outputs, "pred_score", None)
        n = scores.numel() if isinstance(scores, torch.Tensor) else len(getattr(outputs, "image_path", None) or [])
        self._pending = (outputs, _values(scores, n))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the last batch and say where the table is."""
        del trainer
        self._flush(pl_module)
        if self.path is not None:
            logger.info("Per-image results (%d images: path, score, OK/NG label, threshold): %s", self._rows, self.path)

    def _flush(self, pl_module: LightningModule) -> None:
        if self._pending is None or self.path is None:
            return
        outputs, raw = self._pending
        self._pending = None
        n = len(raw)
        paths = getattr(outputs, "image_path", None) or [""] * n
        scores = _values(getattr(outputs, "pred_score", None), n)
        labels = _values(getattr(outputs, "pred_label", None), n)
        post = getattr(pl_module, "post_processor", None)
        raw_threshold = getattr(post, "image_threshold", None)
        raw_threshold = float(raw_threshold) if isinstance(raw_threshold, torch.Tensor) else None
        has_threshold = raw_threshold is not None and not math.isnan(raw_threshold)  # NaN: never set
        threshold = None
        if has_threshold:  # on the reported score: anomalib's normalised threshold, or the raw one unnormalised
            normalised = getattr(post, "enable_normalization", False) and hasattr(post, "normalized_image_threshold")
            threshold = float(post.normalized_image_threshold) if normalised else raw_threshold
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            for path, raw_score, score, label in zip(paths, raw, scores, labels, strict=True):
                verdict = ("NG" if label else "OK") if has_threshold and label is not None else ""
                writer.writerow([
                    str(path),
                    _cell(raw_score),
                    _cell(score),
                    verdict,
                    _cell(threshold),
                    _cell(raw_threshold if has_threshold else None),
                ])
        self._rows += n


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.9g}"
