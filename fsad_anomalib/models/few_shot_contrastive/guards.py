"""What FewShotContrastive refuses, and why.

Unfitted models, checkpoints of another architecture, bad images;
and the pixel metrics it drops on data without masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from anomalib import TaskType
from anomalib.metrics import Evaluator
from torch import nn

__all__ = ["check_architecture", "check_images", "drop_pixel_metrics_without_masks", "unfitted_message"]

# the arguments that shape the weights: a checkpoint of another value cannot be loaded into the model
ARCHITECTURE_ARGS = ("backbone", "layers", "global_layer")


def unfitted_message(what: str, ckpt: str | Path | None = None) -> str:
    """Why an unfitted FewShotContrastive cannot ``what``, naming the checkpoint it came from, and how to get one."""
    source = f"the checkpoint {ckpt} holds a model that was never fitted" if ckpt else "the model was never fitted"
    return (
        f"FewShotContrastive cannot {what}: {source}. Train it (anomalib train / Engine.fit) and use the "
        "checkpoint "
        "that training writes (results/<model>/<dataset>/<category>/latest/weights/lightning/model.ckpt), which "
        "holds the fitted model and its threshold."
    )


def check_images(images: torch.Tensor, what: str) -> None:
    """Refuse a batch that is not RGB images ``(B, 3, H, W)``, or holds NaN or inf, naming ``what`` it is."""
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"{what}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}."
        raise ValueError(msg)
    if not torch.isfinite(images).all():
        msg = f"{what}: images contain NaN or inf."
        raise ValueError(msg)


def check_architecture(hparams: Mapping[str, Any], checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint written by another model, or by a FewShotContrastive of another architecture."""
    state = checkpoint.get("state_dict")
    if state is not None and not any(key.startswith("model.") for key in state):
        msg = "The checkpoint was not written by FewShotContrastive (no 'model.' weights in its state_dict)."
        raise ValueError(msg)
    saved, differences = checkpoint.get("hyper_parameters", {}), []
    for name in (name for name in ARCHITECTURE_ARGS if name in saved and name in hparams):
        mine, theirs = hparams[name], saved[name]
        if isinstance(mine, nn.Module) or isinstance(theirs, nn.Module):
            continue
        if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            differences.append(f"{name}: checkpoint {theirs!r}, model {mine!r}")
    if differences:
        msg = (
            f"The checkpoint comes from a FewShotContrastive of another configuration ({'; '.join(differences)}). "
            "Build the model with the checkpoint's arguments, or use FewShotContrastive.load_from_checkpoint."
        )
        raise ValueError(msg)


def drop_pixel_metrics_without_masks(datamodule: object, evaluator: Evaluator) -> None:
    """Remove the evaluator's pixel metrics for splits without masks.

    ELPV, Textile, a ``Folder`` without ``mask_dir``: the metrics would compute over no update at all, with a
    torchmetrics warning.
    """
    for split, metrics in (("val_data", evaluator.val_metrics), ("test_data", evaluator.test_metrics)):
        if getattr(getattr(datamodule, split, None), "task", None) != TaskType.CLASSIFICATION:
            continue
        for index in reversed(range(len(metrics))):
            if "gt_mask" in getattr(metrics[index], "fields", ()):
                del metrics[index]
