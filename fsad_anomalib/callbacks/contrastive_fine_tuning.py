"""Contrastive fine-tuning of any anomalib model's feature extractor, as a Lightning callback.

Before a model such as PatchCore or PaDiM builds its memory bank or Gaussian from the K normal
training images, :class:`ContrastiveFineTuning` adapts its timm feature extractor to those images with
L_Con + L_PP + L_NP (the shared :class:`~fsad_anomalib.models.components.ContrastiveFineTuner`).
FewShotContrastive fine-tunes through this same callback (it adds one from ``configure_callbacks``).
Projection heads live in the callback and are thrown away; only the extractor's weights change, so the
model's fit, test, checkpoint and export work unchanged and carry the fine-tuned weights.

Which features are trained: a model whose torch model has ``contrastive_features(images)`` (images as the
pre-processor resizes them, returning patch features and a unit-norm embedding) is trained on exactly
those, as FewShotContrastive is. Otherwise the extractor's last output layer gives the embedding and
the others the patch features, both through the shared
:func:`~fsad_anomalib.models.components.fine_tuning.patch_and_global`.

Usage::

    Engine(callbacks=[ContrastiveFineTuning(steps=30)]).fit(Patchcore(...), datamodule=FewShot(...))
    anomalib train --model Patchcore ... --trainer.callbacks+=fsad_anomalib.callbacks.ContrastiveFineTuning
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import nn

from fsad_anomalib.models.components.fine_tuning import ContrastiveFineTuner, forwarded_arguments, patch_and_global

logger = logging.getLogger(__name__)

__all__ = ["TUNED_PARAMETERS", "ContrastiveFineTuning", "find_feature_extractor", "tuned_parameters"]

TUNED_PARAMETERS = ("all", "norm")


def tuned_parameters(network: nn.Module, which: str) -> list[nn.Parameter]:
    """The extractor's parameters that fine-tuning trains: ``all`` of them or the ``norm`` layers' affine ones."""
    if which == "all":
        return list(network.parameters())
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)  # noqa: SLF001
    params = [p for m in network.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)]
    if not params:
        msg = f"tuned_parameters='norm': {type(network).__name__} has no normalisation layer with affine weights."
        raise ValueError(msg)
    return params


def find_feature_extractor(pl_module: LightningModule) -> nn.Module:
    """The timm network inside the model's ``TimmFeatureExtractor`` (``model.feature_extractor``)."""
    model = getattr(pl_module, "model", None)
    extractor = getattr(model, "feature_extractor", None)
    inner = getattr(extractor, "feature_extractor", None)
    if inner is None:
        msg = (
            f"ContrastiveFineTuning needs a model with a TimmFeatureExtractor at model.feature_extractor "
            f"(PatchCore, PaDiM, FewShotContrastive, ...); {type(pl_module).__name__} has none."
        )
        raise TypeError(msg)
    return inner


class ContrastiveFineTuning(Callback):
    """Fine-tune a model's feature extractor on the K normal training images before it is fitted.

    Args:
        steps: AdamW steps.
        batch_size: Images per step. Up to this many training images form one batch; with more (K = 16),
            each step draws a random subset of ``batch_size`` of them, which keeps the cost of a step flat in K.
        lr_backbone, lr_head, weight_decay: Optimiser settings (as in FewShotContrastive).
        temperature, lambda_pp, lambda_np, synthesis, crop_scale, hflip, vflip, rot90, color_jitter,
        dense_negatives, lambda_nn, lambda_pp_dense: Loss, views and synthesis, with FewShotContrastive's meaning and defaults.
        tuned_parameters: ``all`` weights of the extractor, or ``norm``: only the affine weights and biases of
            its normalisation layers (BatchNorm's gamma and beta; their running statistics stay frozen).
        head_warmup_steps: Steps that train the (freshly initialised) projection heads alone, with the
            extractor frozen, before the ``steps`` steps that train both: LP-FT (Kumar et al., ICLR 2022,
            "Fine-Tuning can Distort Pretrained Features"), so that the extractor's first updates follow a
            fitted head rather than a random one. 0 switches it off.
        projection_dim: Output size of the (temporary) projection heads.
        max_images: At most this many training images are used (few-shot: all of them).
        seed: ``None`` (default): the views, synthesized anomalies, head initialisation and batch draws come from
            the global random stream, as ``seed_everything`` left it. An integer: they come from a stream seeded
            with it (the global stream is left as it was) and the training images are taken in the order of their
            paths (when the batches carry ``image_path``, as anomalib's do), not the loader's shuffled order, so a
            run repeats whatever ran before it. anomalib 2.7's CLI
            accepts ``seed_everything`` but never applies it, so a CLI run is repeatable only with this seed.
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
        hflip: bool = True,
        vflip: bool = True,
        rot90: bool = True,
        color_jitter: float = 0.2,
        dense_negatives: bool = True,
        lambda_nn: float = 0.0,
        lambda_pp_dense: float = 0.0,
        tuned_parameters: str = "all",
        head_warmup_steps: int = 0,
        projection_dim: int = 128,
        max_images: int = 64,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            msg = f"seed (FewShotContrastive's fine_tune_seed) must be None or an integer >= 0, got {seed!r}."
            raise ValueError(msg)
        self.seed = seed
        if head_warmup_steps < 0:
            msg = f"head_warmup_steps must be >= 0, got {head_warmup_steps}."
            raise ValueError(msg)
        self.head_warmup_steps = head_warmup_steps
        if tuned_parameters not in TUNED_PARAMETERS:
            msg = f"tuned_parameters must be one of {TUNED_PARAMETERS}, got {tuned_parameters!r}."
            raise ValueError(msg)
        self.tuned_parameters = tuned_parameters
        if steps < 1:
            msg = f"steps must be >= 1, got {steps}."
            raise ValueError(msg)
        if batch_size < 1:
            msg = f"batch_size must be >= 1, got {batch_size}."
            raise ValueError(msg)
        for name, value in {"lr_backbone": lr_backbone, "lr_head": lr_head}.items():
            if value <= 0:
                msg = f"{name} must be > 0, got {value}."
                raise ValueError(msg)
        self.steps = steps
        self.batch_size = batch_size
        self.lr_backbone, self.lr_head, self.weight_decay = lr_backbone, lr_head, weight_decay
        self.projection_dim = projection_dim
        self.max_images = max_images
        self.tuner = ContrastiveFineTuner(**forwarded_arguments(locals(), ContrastiveFineTuner))
        self.history: list[float] = []

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
    def _features_fn(pl_module: LightningModule, network: nn.Module):  # noqa: ANN205
        """images in [0, 1] -> (patch features, unit-norm embedding), through the model's own pre-processing."""
        pre = getattr(getattr(pl_module, "pre_processor", None), "transform", None)
        transform = pre if pre is not None else nn.Identity()
        tap = getattr(getattr(pl_module, "model", None), "contrastive_features", None)
        if tap is not None:
            return lambda batch: tap(transform(batch))

        def features(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = network(transform(batch))
            return patch_and_global(maps[:-1] if len(maps) > 1 else maps, maps[-1])

        return features

    def fine_tune(self, pl_module: LightningModule, images: torch.Tensor, trainer: Trainer | None = None) -> None:
        """Run the fine-tuning on ``images`` (``(K, 3, H, W)`` in [0, 1]; the model's pre-processor resizes them).

        With a ``trainer``, the steps show in a progress bar (when the trainer has one) and each step's losses
        go to the trainer's logger as ``fine_tune/<loss>``. With a ``seed``, the random stream is seeded here and
        restored afterwards.
        """
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

        def embed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            patch, pooled = features(batch)
            return F.normalize(head(pooled), dim=-1), F.normalize(dense_head(patch), dim=1), patch

        grad_flags = {name: p.requires_grad for name, p in network.named_parameters()}
        network.train()
        for module in network.modules():  # K images cannot estimate BatchNorm statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
                module.eval()
        trained = tuned_parameters(network, self.tuned_parameters)
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        for parameter in trained:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [
                {"params": trained, "lr": self.lr_backbone},
                {"params": [*head.parameters(), *dense_head.parameters()], "lr": self.lr_head},
            ],
            weight_decay=self.weight_decay,
        )
        # LP-FT warm-up: the heads alone, with their own Adam state (the joint phase starts from fresh moments)
        head_optimizer = torch.optim.AdamW(
            [*head.parameters(), *dense_head.parameters()], lr=self.lr_head, weight_decay=self.weight_decay
        ) if self.head_warmup_steps else None
        self.history = []
        total_steps = self.head_warmup_steps + self.steps
        show_bar = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
        bar = Tqdm(total=total_steps, desc="Contrastive fine-tuning", leave=False, disable=not show_bar)
        run_logger = trainer.logger if trainer is not None else None
        try:
            with torch.enable_grad(), torch.inference_mode(mode=False):
                for step in range(total_steps):
                    warmup = step < self.head_warmup_steps  # LP-FT: heads alone first
                    for parameter in trained:
                        parameter.requires_grad_(not warmup)
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
                    if warmup and not loss.requires_grad:  # no term of this batch reaches a head
                        bar.update(1)
                        continue
                    step_optimizer = head_optimizer if warmup else optimizer
                    step_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if not warmup:
                        torch.nn.utils.clip_grad_norm_(trained, 1.0)
                    step_optimizer.step()
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
        logger.info("ContrastiveFineTuning: %d head warm-up + %d steps, loss %.3f -> %.3f", self.head_warmup_steps,
                    self.steps, self.history[0], self.history[-1])
