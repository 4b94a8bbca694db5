"""An OK/NG threshold from the K normal training images alone, at a false-reject rate the user chooses.

anomalib's :class:`~anomalib.post_processing.PostProcessor` learns its threshold (the F1-optimal one) and its score
normalisation from a validation set that holds anomalies. A few-shot user has K good images and nothing else.
:class:`NormalThresholdPostProcessor` sets both from those K images:

1. **Held-out evidence.** A training image scores near zero against a memory bank or Gaussian fitted on itself, so
   each of the K images is scored by the model refitted on the other K - 1 (leave-one-out). Below
   ``VIEWS_BELOW`` images, each held-out image is also scored in the flips and turns the product allows, each view
   against the model refitted on the same view of the others; with K = 1 each half of the image (in each view) is
   scored against the model fitted on the other half.
2. **A small-sample bound.** The threshold is the one-sided normal *prediction bound* of the held-out scores
   (log scores where all are positive, since distances are skewed to the right)::

       threshold = mean + t(1 - rate; n - 1) * std * sqrt(1 + 1 / n)

   For scores drawn from a normal distribution, a new normal image exceeds it with probability exactly
   ``rate``, whatever n is (Student's t accounts for the mean and the deviation being estimated from n samples).
   A plain quantile cannot do that with 4 or 8 samples (a 5 % quantile needs at least 20), and a conformal bound
   would be infinite below 19. The price is the normality assumption; the benchmark measures the rate it reaches
   on test normals.
   Leave-one-out scores come from K - 1 references and a new part is scored against K; no correction is made
   for that difference.
3. **Labels, masks and normalised scores.** The image threshold is set on the held-out image scores, the pixel
   threshold on the maxima of the held-out anomaly maps (so that a good part's mask is empty at the same rate),
   and both become anomalib's threshold buffers: the normalised score is 0.5 at the threshold, 0.25 at the lowest
   held-out normal score, 0.75 as far above the threshold as that is below it, and strictly increasing in (0, 1)
   (never clamped, so AUROC on normalised scores equals AUROC on raw ones). Checkpoints and exported graphs carry
   the buffers, so a deployed model labels as the trained one does.

Confirmation on the line (:mod:`fsad_anomalib.confirm`) later resets both thresholds from N further good parts.

Any memory-bank anomalib model (PatchCore, PaDiM, DFM, DFKDE, ...: a ``fit()`` after a training epoch that runs
no optimiser) is refitted on copies made before its training epoch. A model can instead offer
``refit(images) -> scorer`` (:class:`Refittable`), as FewShotContrastive does (its self-configuration and
fine-tuning are kept; only the fit is redone).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer
from torch import nn

from fsad_anomalib.data.few_shot import skip_validation_without_data
from fsad_anomalib.data.views import NO_SYMMETRY, Symmetries, held_out_groups, resolve_symmetries
from fsad_anomalib.post_processing.bounds import bound_at, check_rate, prediction_bound
from fsad_anomalib.post_processing.evidence import VIEWS_BELOW, Refittable, can_refit, held_out_scores, refit_copy

logger = logging.getLogger(__name__)

__all__ = ["REFERENCES_KEY", "NormalThresholdPostProcessor"]

# where checkpoints keep the images the model is fitted on
REFERENCES_KEY = "fsad_references"


class NormalThresholdPostProcessor(PostProcessor):
    """anomalib's post-processor with its threshold and normalisation set from the K normal training images.

    Use it with any memory-bank anomalib model, or with FewShotContrastive (its default), and no validation split
    (``val_split_mode: none``): the threshold is set when training ends, from leave-one-out refits on the training
    images. Validation batches, where there are any, do not change it. To learn anomalib's F1-optimal threshold
    from labelled anomalies instead, use :class:`anomalib.post_processing.PostProcessor` and a validation set.

    Args:
        false_reject_rate (float): Target share of good parts rejected, in (0, 0.5): 0.05 rejects about 50 good
            parts in 1,000. Defaults to ``0.05``.
        symmetries (Sequence[str] | None): The flips and turns (``hflip``, ``vflip``, ``rot90``) that leave a good
            part good: such views of a held-out image count as held-out normals below ``VIEWS_BELOW`` images.
            ``None`` (the default) takes the model's own where it declares them (FewShotContrastive), else none: a
            symmetry is a claim about the product that only the user can make.
        **kwargs: :class:`~anomalib.post_processing.PostProcessor`'s arguments (``image_sensitivity`` other
            than 0.5 moves the decision away from the threshold).

    Example:
        >>> from anomalib.models import Patchcore
        >>> from fsad_anomalib.post_processing import NormalThresholdPostProcessor
        >>> model = Patchcore(post_processor=NormalThresholdPostProcessor(false_reject_rate=0.01))
    """

    def __init__(
        self,
        false_reject_rate: float = 0.05,
        symmetries: Sequence[str] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        check_rate(false_reject_rate)
        super().__init__(**kwargs)
        self.false_reject_rate = float(false_reject_rate)
        # plain names (checkpoints keep them); unset until calibration resolves them with the model's
        self.symmetries = None if symmetries is None else Symmetries.of(symmetries).names
        # what the threshold was computed from (plain types: it goes into checkpoints)
        self.calibration: dict[str, Any] = {}
        self._images: dict[str, torch.Tensor] = {}
        self._snapshot: LightningModule | None = None
        self._calibrated = False
        # the images the model is fitted on, as it saw them: checkpoints keep them, so that it can grow on the line
        self.references: torch.Tensor | None = None

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "false_reject_rate", "symmetries", "calibration")

    # ------------------------------------------------------------------ collecting the K normals
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: PLR6301 - Lightning's hook
        """No validation pass where the datamodule has none (``val_split_mode="none"``): the threshold needs none."""
        del pl_module
        if stage == "fit":
            skip_validation_without_data(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new calibration, and refuse a model it cannot refit before anything runs."""
        del trainer
        self._images, self._snapshot, self._calibrated = {}, None, False
        if not can_refit(pl_module):
            msg = (
                f"NormalThresholdPostProcessor sets its threshold from leave-one-out refits on the training images, "
                f"and {type(pl_module).__name__} can be neither refitted (it has no fit() after its training epoch, "
                "as memory-bank models such as Patchcore and Padim do) nor asked to (no refit(images) method). Use "
                "anomalib's PostProcessor and a validation set with labelled anomalies for this model."
            )
            raise TypeError(msg)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Batch, batch_idx: int) -> None:
        """Copy the model as it is before its first training step (after fine-tuning callbacks): the refits' start."""
        del trainer, batch, batch_idx
        if self._snapshot is None and not isinstance(pl_module, Refittable):
            attached = pl_module._trainer  # noqa: SLF001 - a copy must not drag the trainer (and its data) along
            pl_module._trainer = None  # noqa: SLF001
            try:
                self._snapshot = copy.deepcopy(pl_module)
            finally:
                pl_module._trainer = attached  # noqa: SLF001

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401 - Lightning's hook signature
        batch: Batch,
        batch_idx: int,
    ) -> None:
        """Keep the training images as the model saw them (after the pre-processor)."""
        del trainer, pl_module, outputs, batch_idx
        paths = getattr(batch, "image_path", None) or [None] * batch.image.shape[0]
        for index, path in enumerate(paths):
            key = str(path) if path is not None else f"#{len(self._images):06d}"
            self._images[key] = batch.image[index].detach().cpu().clone()

    # ------------------------------------------------------------------ when the threshold is set
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the threshold before the first validation (validation data never changes it)."""
        del trainer
        self._calibrate_once(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the threshold when the epoch ends without a validation pass (``val_split_mode: none``).

        Lightning runs this hook before the module's and before ``ModelCheckpoint`` saves, so every checkpoint
        written during training carries the threshold.
        """
        del trainer
        self._calibrate_once(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the threshold when training stops before the epoch's end."""
        del trainer
        self._calibrate_once(pl_module)

    def on_save_checkpoint(
        self, trainer: Trainer | None, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the reference images in the checkpoint (half precision), for growth on the line."""
        del trainer, pl_module
        if self.references is not None:
            checkpoint[REFERENCES_KEY] = self.references.detach().cpu().half()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``--export_type torch``) leave the training images out: checkpoints keep them."""
        return {**super().__getstate__(), "references": None, "_images": {}, "_snapshot": None}

    def on_load_checkpoint(
        self, trainer: Trainer | None, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Restore the reference images a checkpoint keeps."""
        del trainer, pl_module
        if checkpoint.get(REFERENCES_KEY) is not None:
            self.references = checkpoint[REFERENCES_KEY].float()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Validation batches do not move a threshold set on the normals."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validation batches do not move a threshold set on the normals."""

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when testing without a threshold (a model built but never trained with this post-processor)."""
        del trainer, pl_module
        self._warn_if_unset("test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when predicting without a threshold."""
        del trainer, pl_module
        self._warn_if_unset("predict")

    def _warn_if_unset(self, what: str) -> None:
        if torch.isnan(self._image_threshold).item() and torch.isnan(self._pixel_threshold).item():
            logger.warning(
                "NormalThresholdPostProcessor: no threshold to %s with: train the model (with this "
                "post-processor) or load a trained checkpoint; scores are left raw and unlabelled.",
                what,
            )

    def _calibrate_once(self, pl_module: LightningModule) -> None:
        if self._calibrated or not self._images:
            return
        self._calibrated = True
        self.symmetries = resolve_symmetries(self.symmetries, pl_module, NO_SYMMETRY).names
        images = torch.stack([self._images[key] for key in sorted(self._images)])
        refit = pl_module.refit if isinstance(pl_module, Refittable) else self._refit
        was_training = pl_module.training
        try:
            self.calibrate(images, refit, floor=getattr(pl_module, "score_floor", None))
        finally:
            pl_module.train(was_training)
            self._snapshot = None  # the copy is only needed for the refits
            self._images, self.references = {}, images

    # ------------------------------------------------------------------ the threshold
    def _refit(self, images: torch.Tensor) -> nn.Module:
        """The model refitted on ``images`` from the copy made before training."""
        if self._snapshot is None:
            msg = "NormalThresholdPostProcessor: no copy of the model from before training to refit."
            raise RuntimeError(msg)
        return refit_copy(self._snapshot, images)

    def calibrate(
        self,
        images: torch.Tensor,
        refit: Callable[[torch.Tensor], nn.Module],
        floor: Callable[[], tuple[float, float] | None] | None = None,
    ) -> dict[str, Any]:
        """Set the image and pixel thresholds and the normalisation from held-out scores of the normal ``images``.

        ``refit(images)`` returns a scorer fitted on ``images``; ``floor()`` (the model's ``score_floor``), where it
        has them, the lowest image score and map value the fitted model can give. The record is kept in ``calibration``
        (and in checkpoints).
        """
        k = images.shape[0]
        try:
            evidence = held_out_scores(images, refit, Symmetries.of(self.symmetries or []))
        except ValueError as error:
            logger.warning("NormalThresholdPostProcessor: %s; no threshold is set and scores stay unlabelled.", error)
            self.calibration = {"k_shot": k, "error": str(error)}
            return self.calibration
        except Exception as error:  # noqa: BLE001 - the model's own fit failed on fewer images: train on, unlabelled
            kept = k - len(held_out_groups(k)[0]) if k > 1 else 1
            text = f"the model could not be refitted on {kept} of the {k} images ({type(error).__name__}: {error})"
            msg = "NormalThresholdPostProcessor: %s; no threshold is set, scores stay unlabelled. Train on more images."
            logger.warning(msg, text)
            self.calibration = {"k_shot": k, "error": text}
            return self.calibration
        scores, maxima, n_scores, n_views = evidence["scores"], evidence["maxima"], evidence["n"], evidence["views"]
        floors = (floor() if floor is not None else None) or (None, None)  # fitted by now: the refits fit it first
        record: dict[str, Any] = {
            "k_shot": k,
            "false_reject_rate": self.false_reject_rate,
            "views": n_views,
            "estimator": "normal prediction bound",
            "held_out_scores": scores.tolist(),
        }
        image = self._bound(scores, n_scores, "image scores", floors[0])
        if image is not None:
            lowest = float(scores[torch.isfinite(scores)].min())
            record["image"] = {**image, "lowest": lowest}
            self._set(self._image_threshold, self.image_min, self.image_max, image["threshold"], lowest)
        finite = maxima[torch.isfinite(maxima)]
        pixel = self._bound(maxima, n_scores, "anomaly-map maxima", floors[1]) if finite.numel() else None
        if pixel is not None:
            record["pixel"] = {**pixel, "lowest": float(finite.min())}
            self._set(self._pixel_threshold, self.pixel_min, self.pixel_max, pixel["threshold"], float(finite.min()))
        if k == 1:
            logger.warning(
                "NormalThresholdPostProcessor: the threshold rests on one image (each half scored against the "
                "other, in %d flips and turns): its false-reject rate is a rough guess. Train on more normal "
                "images for a threshold you can defend.",
                n_views,
            )
        elif k < VIEWS_BELOW:
            logger.warning(
                "NormalThresholdPostProcessor: the threshold rests on %d images (each also scored in its "
                "flips and turns, which are not independent): its false-reject rate is uncertain.",
                k,
            )
        if image is not None:
            logger.info(
                "NormalThresholdPostProcessor: image threshold %.6g for a %.1f %% false-reject rate, from %d "
                "held-out scores of %d images",
                image["threshold"],
                100 * self.false_reject_rate,
                scores.numel(),
                k,
            )
        self.calibration = record
        return record

    def _bound(self, scores: torch.Tensor, n_scores: int, what: str, floor: float | None) -> dict[str, Any] | None:
        finite = scores[torch.isfinite(scores)]
        if finite.numel() < scores.numel():
            logger.warning(
                "NormalThresholdPostProcessor: %d of %d held-out %s are NaN or infinite (the model cannot "
                "score from the remaining images); they are left out.",
                scores.numel() - finite.numel(),
                scores.numel(),
                what,
            )
        try:
            return prediction_bound(finite, self.false_reject_rate, min(n_scores, finite.numel()), floor)
        except ValueError as error:
            logger.warning("NormalThresholdPostProcessor: no threshold from the %s: %s", what, error)
            return None

    def adopt(self, record: dict[str, Any]) -> None:
        """Put the thresholds of ``record`` in force.

        ``image`` and ``pixel``, each with the ``lowest`` normal score, and ``false_reject_rate``; ``calibration``
        becomes the record (confirmation uses this).
        """
        for key, (threshold, low, high) in {
            "image": (self._image_threshold, self.image_min, self.image_max),
            "pixel": (self._pixel_threshold, self.pixel_min, self.pixel_max),
        }.items():
            if key in record:
                self._set(threshold, low, high, record[key]["threshold"], record[key]["lowest"])
        self.false_reject_rate = float(record.get("false_reject_rate", self.false_reject_rate))
        self.calibration = record

    def threshold_at(self, false_reject_rate: float) -> float:
        """The image threshold the calibration gives at another target ``false_reject_rate``, without refitting.

        Raises:
            ValueError: The rate is not in (0, 0.5), or no image threshold has been set (train the model first).
        """
        check_rate(false_reject_rate)
        if "image" not in self.calibration:
            msg = "no image threshold has been set yet: train the model with this post-processor, or load a checkpoint."
            raise ValueError(msg)
        return bound_at(self.calibration["image"], float(false_reject_rate))

    def set_false_reject_rate(self, false_reject_rate: float) -> None:
        """Move the image and pixel thresholds to another target rate, from the same held-out evidence.

        The held-out scores are kept in ``calibration``, so a line can tighten or loosen its decision after training
        without another fit. Save the checkpoint (or export) again afterwards to deploy the new thresholds.
        """
        image = self.threshold_at(false_reject_rate)
        self.false_reject_rate = float(false_reject_rate)
        self._set(self._image_threshold, self.image_min, self.image_max, image, self.calibration["image"]["lowest"])
        self.calibration["image"]["threshold"] = image
        if "pixel" in self.calibration:
            pixel = bound_at(self.calibration["pixel"], self.false_reject_rate)
            self._set(self._pixel_threshold, self.pixel_min, self.pixel_max, pixel, self.calibration["pixel"]["lowest"])
            self.calibration["pixel"]["threshold"] = pixel
        self.calibration["false_reject_rate"] = self.false_reject_rate

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None, norm_min: torch.Tensor, norm_max: torch.Tensor, threshold: torch.Tensor
    ) -> torch.Tensor | None:
        """Map ``preds`` into (0, 1), strictly increasing: 0.5 at the threshold, 0.25 at the lowest held-out normal.

        With ``z = (preds - threshold) / (threshold - norm_min)`` the map is ``0.5 + 0.5 * z / (1 + |z|)``: 0.75 as far
        above the threshold as the lowest normal lies below it, and never clamped, so scores keep their order
        (anomalib's linear map clamps every score beyond its range to 0 or 1, which ties the anomalies far above a
        threshold set from normals alone, and lowers AUROC). Left raw where no threshold was set.
        """
        if preds is None:
            return preds
        half_range = (norm_max - norm_min) / 2
        safe = torch.where(half_range > 0, half_range, torch.ones_like(half_range))
        z = (preds - threshold) / safe
        normalized = 0.5 + 0.5 * z / (1 + z.abs())
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max) & ~torch.isnan(threshold)
        return torch.where(has_range, normalized, preds)

    @staticmethod
    def _set(threshold: torch.Tensor, low: torch.Tensor, high: torch.Tensor, value: float, lowest: float) -> None:
        """Buffers for :meth:`_normalize`: 0.25 at the lowest held-out normal, 0.5 at the threshold."""
        lowest = min(lowest, value)
        threshold.fill_(value)
        low.fill_(lowest)
        high.fill_(2 * value - lowest if value > lowest else value + 1.0)
