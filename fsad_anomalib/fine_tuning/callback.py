"""Contrastive fine-tuning of any anomalib model's feature extractor, as a Lightning callback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.core.mixins import HyperparametersMixin
from torch import nn

from fsad_anomalib.backbones.features import patch_and_global
from fsad_anomalib.data.views import Symmetries, resolve_symmetries
from fsad_anomalib.fine_tuning.tuner import ContrastiveFineTuner
from fsad_anomalib.fine_tuning.views import ViewAugmentation

logger = logging.getLogger(__name__)

__all__ = ["ContrastiveFeatures", "ContrastiveFineTuning", "find_feature_extractor", "trained_parameters"]

# the projection heads' output size (the paper's), and at most this many training images from a loader
PROJECTION_DIM = 128
MAX_IMAGES = 64


@runtime_checkable
class ContrastiveFeatures(Protocol):
    """A torch model that names the features it scores (FewShotContrastive): fine-tuning trains exactly those."""

    def contrastive_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch features ``(B, C, h, w)`` and unit-norm embeddings ``(B, D)`` of normalised-to-be images."""
        ...


def _extractor(pl_module: LightningModule) -> nn.Module:
    """The model's ``TimmFeatureExtractor``: ``model.feature_extractor``, or AnomalyDINO's ``model.feature_encoder``."""
    model = getattr(pl_module, "model", None)
    for attribute in ("feature_extractor", "feature_encoder"):
        extractor = getattr(model, attribute, None)
        if getattr(extractor, "feature_extractor", None) is not None:
            return extractor
    msg = (
        f"ContrastiveFineTuning needs a model with a TimmFeatureExtractor at model.feature_extractor or "
        f"model.feature_encoder (PatchCore, PaDiM, AnomalyDINO, FewShotContrastive, ...); {type(pl_module).__name__} "
        "has none."
    )
    raise TypeError(msg)


def find_feature_extractor(pl_module: LightningModule) -> nn.Module:
    """The timm network inside the model's ``TimmFeatureExtractor`` (at ``model.feature_extractor`` or ``encoder``).

    Raises:
        TypeError: The model has no ``TimmFeatureExtractor`` there.
    """
    return _extractor(pl_module).feature_extractor


def trained_parameters(network: nn.Module) -> tuple[list[nn.Parameter], str]:
    """What fine-tuning trains in ``network``, and a sentence that says so.

    A CNN: every weight (its BatchNorm statistics stay frozen: K images cannot estimate them). A ViT (a timm
    network with ``patch_embed`` and ``blocks``): the second half of its blocks, from the block at half the depth
    (FewShotContrastive's first default patch layer), and the final norm; the patch and position embeddings, the
    class and register tokens and the first blocks stay as they are (a ViT has no BatchNorm).
    """
    blocks = getattr(network, "blocks", None)
    if getattr(network, "patch_embed", None) is None or not isinstance(blocks, nn.Sequential | nn.ModuleList):
        return list(network.parameters()), "every weight of the backbone, BatchNorm statistics frozen"
    first = max(len(blocks) // 2 - 1, 0)
    norm = getattr(network, "norm", None)
    trained = [*blocks[first:].parameters(), *(norm.parameters() if isinstance(norm, nn.Module) else [])]
    total = sum(p.numel() for p in network.parameters())
    return trained, (
        f"blocks {first}-{len(blocks) - 1} and the final norm of the ViT ({sum(p.numel() for p in trained) / 1e6:.1f} "
        f"M of {total / 1e6:.1f} M weights); the patch and position embeddings, prefix tokens and blocks 0-{first - 1} "
        "stay as they are"
    )


def _positive(name: str, value: float, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        msg = f"ContrastiveFineTuning: {name} must be {'> 0' if strict else '>= 0'}, got {value}."
        raise ValueError(msg)


class ContrastiveFineTuning(HyperparametersMixin, Callback):
    """Fine-tune a model's feature extractor on the K normal training images before the model is fitted.

    Before a model such as FewShotContrastive, PatchCore or PaDiM builds its Gaussian or memory bank from the
    K normal images, this callback adapts its timm feature extractor to them with
    L = L_Con + lambda_PP * L_PP + lambda_NP * L_NP (:class:`~fsad_anomalib.fine_tuning.ContrastiveFineTuner`).
    Projection heads live in the callback and are thrown away: only the extractor's weights change, so the
    model's fit, test, checkpoint and export work unchanged and carry the fine-tuned weights.

    A model whose torch model has ``contrastive_features(images)`` (:class:`ContrastiveFeatures`, as
    FewShotContrastive) is trained on exactly the features it scores. For any other model the extractor's last
    output layer gives the embedding and the others the patch features
    (:func:`~fsad_anomalib.backbones.features.patch_and_global`).

    Args:
        steps (int): AdamW steps. Defaults to ``30``.
        batch_size (int): Images per step. Up to this many training images form one batch; with more, each step
            draws a random subset of ``batch_size``, which keeps the cost of a step flat in K. Defaults to ``8``.
        lr_backbone (float): Learning rate of the feature extractor. Defaults to ``1e-4``.
        lr_head (float): Learning rate of the projection heads. Defaults to ``1e-3``.
        weight_decay (float): AdamW weight decay. Defaults to ``1e-4``.
        temperature (float): Temperature of L_Con and L_NP. Defaults to ``0.1``.
        lambda_pp (float): Weight of L_PP, cross-instance positives (0 switches them off). Defaults to ``0.5``.
        lambda_np (float): Weight of L_NP, synthesized negatives (0 switches them off). Defaults to ``1.0``.
        synthesis (str): Anomalies for L_NP: ``cutpaste``, ``speck`` (small noisy spots) or ``none``.
            Defaults to ``"cutpaste"``.
        crop_scale (float): Smallest area fraction of the random resized crop of each view. Defaults to ``0.8``.
        symmetries (Sequence[str] | None): Random flips and turns of the views, among ``hflip``, ``vflip`` and
            ``rot90``. ``None``: the model's own where it declares them (FewShotContrastive's), else all three.
            Defaults to ``None``.
        color_jitter (float): Brightness and contrast jitter of the views. Defaults to ``0.2``.
        seed (int | None): ``None``: views, anomalies, head initialisation and batch draws come from the global
            random stream, as ``seed_everything`` left it. An integer: from a stream seeded with it (the global
            stream is left as it was), the training images taken in the order of their paths, so a run repeats
            whatever ran before it. anomalib 2.7's CLI parses ``seed_everything`` but never applies it, so a CLI
            run repeats only with this seed. Defaults to ``None``.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib.models import Patchcore
        >>> from fsad_anomalib.fine_tuning import ContrastiveFineTuning
        >>> engine = Engine(callbacks=[ContrastiveFineTuning(steps=30, seed=0)])
        >>> engine.fit(Patchcore(), datamodule=datamodule)  # doctest: +SKIP

        From the CLI: ``anomalib train --model Patchcore ... --trainer.callbacks+=ContrastiveFineTuning``.
    """

    def __init__(
        self,
        steps: int = 30,
        batch_size: int = 8,
        lr_backbone: float = 1e-4,
        lr_head: float = 1e-3,
        weight_decay: float = 1e-4,
        temperature: float = 0.1,
        lambda_pp: float = 0.5,
        lambda_np: float = 1.0,
        synthesis: str = "cutpaste",
        crop_scale: float = 0.8,
        symmetries: Sequence[str] | None = None,
        color_jitter: float = 0.2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in {"steps": steps, "batch_size": batch_size}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"ContrastiveFineTuning: {name} must be an integer >= 1, got {value!r}."
                raise ValueError(msg)
        _positive("lr_backbone", lr_backbone)
        _positive("lr_head", lr_head)
        _positive("weight_decay", weight_decay, strict=False)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            msg = f"ContrastiveFineTuning: seed must be None or an integer >= 0, got {seed!r}."
            raise ValueError(msg)
        self.save_hyperparameters()
        self.steps, self.batch_size, self.max_images, self.seed = steps, batch_size, MAX_IMAGES, seed
        self.lr_backbone, self.lr_head, self.weight_decay = lr_backbone, lr_head, weight_decay
        self.projection_dim = PROJECTION_DIM
        self.symmetries = None if symmetries is None else Symmetries.of(symmetries)
        self.crop_scale, self.color_jitter = crop_scale, color_jitter
        # built now so that a wrong temperature, weight, synthesis or crop scale fails at construction
        self.tuner = ContrastiveFineTuner(
            temperature, lambda_pp, lambda_np, synthesis, ViewAugmentation(crop_scale, color_jitter=color_jitter)
        )
        self.history: list[float] = []

    @classmethod
    def from_value(
        cls, value: ContrastiveFineTuning | bool | Mapping[str, Any] | str, seed: int = 0
    ) -> ContrastiveFineTuning | None:
        """The fine-tuning a model argument stands for; ``None`` for the frozen backbone.

        ``"auto"``: the default fine-tuning seeded with ``seed`` (which the model tries before it keeps it); ``True``
        the defaults; ``False`` none; a mapping: its arguments (as a checkpoint stores them, or a JSON object).
        """
        if isinstance(value, str) and value == "auto":
            return cls(seed=seed)
        if isinstance(value, cls) or value is None:
            return value
        if isinstance(value, bool):
            return cls() if value else None
        if isinstance(value, Mapping):
            return cls(**dict(value.get("init_args", value)))
        msg = (
            f"fine_tuning must be 'auto' (fine-tune only where it helps), true, false (frozen backbone), a "
            f"ContrastiveFineTuning or a mapping of its arguments, got {value!r}."
        )
        raise (ValueError if isinstance(value, str) else TypeError)(msg)

    def _views_for(self, pl_module: LightningModule) -> ViewAugmentation:
        """The views' augmentation, unset symmetries the model's (all three where it declares none)."""
        symmetries = resolve_symmetries(self.symmetries, pl_module, Symmetries())
        return ViewAugmentation(self.crop_scale, symmetries=symmetries, color_jitter=self.color_jitter)

    def _support_images(self, trainer: Trainer) -> torch.Tensor:
        loader = trainer.train_dataloader
        if loader is None:
            msg = "ContrastiveFineTuning: the trainer has no training data loader."
            raise RuntimeError(msg)
        images, paths = [], []
        for batch in loader:
            images.append(batch.image)
            batch_paths = getattr(batch, "image_path", None)
            paths += list(batch_paths) if batch_paths is not None else [None] * len(batch.image)
            if sum(len(i) for i in images) >= self.max_images:
                break
        images = torch.cat(images)
        if self.seed is not None and None not in paths:  # the loader shuffles: take the images in path order
            order = sorted(range(len(paths)), key=lambda i: str(paths[i]))
            images = images[torch.tensor(order)]
        return images[: self.max_images]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fine-tune before the first training step (where models collect their embeddings or support set)."""
        self.fine_tune(pl_module, self._support_images(trainer).to(pl_module.device), trainer)

    @staticmethod
    def _features_fn(pl_module: LightningModule, network: nn.Module) -> Callable:
        """Images in [0, 1] -> (patch features, unit-norm embedding), through the model's own pre-processing."""
        pre = getattr(getattr(pl_module, "pre_processor", None), "transform", None)
        transform = pre if pre is not None else nn.Identity()
        model = getattr(pl_module, "model", None)
        if isinstance(model, ContrastiveFeatures):
            return lambda batch: model.contrastive_features(transform(batch))
        extractor = _extractor(pl_module)

        def maps_of(batch: torch.Tensor) -> list[torch.Tensor]:
            if getattr(extractor, "_uses_intermediates", False):  # a ViT (AnomalyDINO's encoder): blocks as maps
                return network.forward_intermediates(
                    batch, indices=list(extractor.idx), norm=extractor.norm, output_fmt="NCHW", intermediates_only=True
                )
            return list(network(batch))

        def features(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = maps_of(transform(batch))
            return patch_and_global(maps[:-1] if len(maps) > 1 else maps, maps[-1])

        return features

    def fine_tune(self, pl_module: LightningModule, images: torch.Tensor, trainer: Trainer | None = None) -> None:
        """Fine-tune ``pl_module``'s extractor on ``images`` (``(K, 3, H, W)`` in [0, 1], resized by its pre-processor).

        With a ``trainer``, the steps show in a progress bar (when the trainer has one) and each step's losses
        go to the trainer's logger as ``fine_tune/<loss>``. With a ``seed``, the random stream is seeded here and
        restored afterwards.
        """
        self.tuner.augment = self._views_for(pl_module)
        if self.seed is None:
            self._fine_tune(pl_module, images, trainer)
            return
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            self._fine_tune(pl_module, images, trainer)

    def _fine_tune(self, pl_module: LightningModule, images: torch.Tensor, trainer: Trainer | None) -> None:
        network = find_feature_extractor(pl_module)
        if not self.tuner.has_signal(min(images.shape[0], self.batch_size)):
            logger.warning(
                "ContrastiveFineTuning: K = 1 with L_NP switched off: no loss term has a negative, fine-tuning is "
                "skipped and the model keeps its pretrained backbone."
            )
            return
        features = self._features_fn(pl_module, network)
        was_training = network.training
        network.eval()
        with torch.no_grad():
            patch, pooled = features(images[:1])
        device = images.device
        head = nn.Sequential(nn.Linear(pooled.shape[1], 512), nn.ReLU(), nn.Linear(512, self.projection_dim)).to(device)
        dense_head = nn.Sequential(
            nn.Conv2d(patch.shape[1], 256, 1), nn.ReLU(), nn.Conv2d(256, self.projection_dim, 1)
        ).to(device)

        def embed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            patch, pooled = features(batch)
            return F.normalize(head(pooled), dim=-1), F.normalize(dense_head(patch), dim=1)

        grad_flags = {name: p.requires_grad for name, p in network.named_parameters()}
        network.train()
        for module in network.modules():  # K images cannot estimate BatchNorm statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
                module.eval()
        trained, what = trained_parameters(network)
        chosen = {id(parameter) for parameter in trained}
        for parameter in network.parameters():
            parameter.requires_grad_(requires_grad=id(parameter) in chosen)
        logger.info("ContrastiveFineTuning: trains %s", what)
        optimizer = torch.optim.AdamW(
            [
                {"params": trained, "lr": self.lr_backbone},
                {"params": [*head.parameters(), *dense_head.parameters()], "lr": self.lr_head},
            ],
            weight_decay=self.weight_decay,
        )
        self.history = []
        show_bar = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
        bar = Tqdm(total=self.steps, desc="Contrastive fine-tuning", disable=not show_bar)
        run_logger = trainer.logger if trainer is not None else None
        try:
            with torch.enable_grad(), torch.inference_mode(mode=False):
                for step in range(self.steps):
                    batch = images
                    if images.shape[0] > self.batch_size:
                        batch = images[torch.randperm(images.shape[0], device=device)[: self.batch_size]]
                    loss, parts = self.tuner(batch, embed)
                    if not torch.isfinite(loss):
                        msg = (
                            f"ContrastiveFineTuning: the loss became {loss.item()} at step {step}; lower lr_backbone "
                            "and lr_head."
                        )
                        raise FloatingPointError(msg)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trained, 1.0)
                    optimizer.step()
                    self.history.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.history[-1]:.3f}")
                    if run_logger is not None:
                        metrics = {"fine_tune/loss": self.history[-1]}
                        metrics.update({f"fine_tune/{k}": float(v) for k, v in parts.items()})
                        run_logger.log_metrics(metrics, step=step)
        finally:
            bar.close()
            for name, parameter in network.named_parameters():
                parameter.requires_grad_(grad_flags[name])
            network.train(was_training)
            optimizer.zero_grad(set_to_none=True)
        logger.info("ContrastiveFineTuning: %d steps, loss %.3f -> %.3f", self.steps, self.history[0], self.history[-1])
