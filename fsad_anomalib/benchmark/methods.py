"""Methods the benchmark compares, all on the same backbone, weights and image size."""

from __future__ import annotations

from typing import Any

from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib.models import Padim, Patchcore
from anomalib.pre_processing import PreProcessor

from fsad_anomalib.backbones import resolve_backbone
from fsad_anomalib.models import FewShotContrastive

__all__ = ["METHODS", "build_method", "method_callbacks"]


def method_callbacks(name: str) -> list:
    """Extra Lightning callbacks of a method: contrastive fine-tuning for the "+fine-tuning" rows."""
    if name.endswith("+fine-tuning"):
        from fsad_anomalib.callbacks import ContrastiveFineTuning  # noqa: PLC0415

        return [ContrastiveFineTuning()]
    return []

# FewShotContrastive variants: the default model (L_Con + L_PP + L_NP) and the paper's ablations.
_FSC_VARIANTS: dict[str, dict[str, Any]] = {
    "FewShotContrastive": {},
    "frozen": {"fine_tune": False},
    "L_Con": {"lambda_pp": 0.0, "synthesis": "none"},
    "L_Con+L_PP": {"synthesis": "none"},
}
METHODS = (*_FSC_VARIANTS, "PatchCore", "PaDiM", "PatchCore+fine-tuning", "PaDiM+fine-tuning")


def build_method(name: str, backbone: str, image_size: int, fsc_args: dict[str, Any] | None = None):  # noqa: ANN201
    """Instantiate method ``name``; PatchCore and PaDiM get the backbone's normalisation and image size."""
    if name in _FSC_VARIANTS:
        args = {"visualizer": False, **(fsc_args or {}), **_FSC_VARIANTS[name]}
        return FewShotContrastive(backbone=backbone, image_size=image_size, **args)
    name = name.removesuffix("+fine-tuning")
    timm_name = resolve_backbone(backbone)
    probe = FewShotContrastive(backbone=backbone, image_size=image_size, fine_tune=False)
    mean = probe.model.pixel_mean.flatten().tolist()
    std = probe.model.pixel_std.flatten().tolist()
    pre = PreProcessor(transform=Compose([Resize((image_size, image_size), antialias=True), Normalize(mean, std)]))
    if name == "PatchCore":
        return Patchcore(backbone=timm_name, layers=["blocks.2", "blocks.4"], pre_processor=pre, visualizer=False)
    if name == "PaDiM":
        return Padim(backbone=timm_name, layers=["blocks.1", "blocks.2", "blocks.4"], n_features=100, pre_processor=pre,
                     visualizer=False)
    msg = f"Unknown method '{name}'. Known: {METHODS}."
    raise ValueError(msg)
