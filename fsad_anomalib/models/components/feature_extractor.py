"""Run anomalib's ``TimmFeatureExtractor`` only as deep as the layers a caller needs.

timm's ``features_only`` EfficientNet and MobileNetV3 run every block whatever ``out_indices`` asks for, and a
``FeatureListNet`` (ResNet and most other CNNs) stops only after the deepest requested layer. FewShotContrastive
requests its global layer (``blocks.6`` on EfficientNet-Lite0) for fine-tuning, but its patch and knn scorings
read only the patch layers (``blocks.2``, ``blocks.4``): at inference, the blocks after the deepest patch layer
are wasted work (about half of Lite0's time at 256 px on CPU). :func:`features_until` returns the same tensors
without running them, and the traced ONNX/OpenVINO graphs contain only the blocks that are run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components import TimmFeatureExtractor
from timm.models._features import FeatureDictNet
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features

__all__ = ["features_until"]


def _positions(extractor: TimmFeatureExtractor, layers: Sequence[int | str]) -> list[int]:
    known = list(extractor.layers)
    missing = [layer for layer in layers if layer not in known]
    if missing:
        msg = f"layers {missing} are not among the feature extractor's layers {known}."
        raise ValueError(msg)
    return [known.index(layer) for layer in layers]


def features_until(
    extractor: TimmFeatureExtractor,
    inputs: torch.Tensor,
    layers: Sequence[int | str],
) -> dict[int | str, torch.Tensor]:
    """Outputs of ``layers`` (a subset of ``extractor.layers``), identical to ``extractor(inputs)``'s.

    The backbone stops after the deepest of ``layers`` for timm's EfficientNet / MobileNetV3 feature models and
    its ``FeatureListNet``/``FeatureDictNet`` wrappers; any other extractor (``nn.Module`` backbones traced by
    torchvision, transformers) runs whole and the requested layers are picked from its output.
    """
    positions = _positions(extractor, layers)
    net = extractor.feature_extractor
    if isinstance(net, EfficientNetFeatures | MobileNetV3Features) and net.feature_hooks is None:
        stages = sorted(net._stage_out_idx)  # noqa: SLF001  (output position -> stage, as in their forward)
        wanted = {stages[p]: layer for p, layer in zip(positions, layers, strict=True)}
        out: dict[int | str, torch.Tensor] = {}
        x = net.bn1(net.conv_stem(inputs))
        if 0 in wanted:
            out[wanted[0]] = x
        for i, block in enumerate(net.blocks):
            if len(out) == len(wanted):
                break
            x = block(x)
            if i + 1 in wanted:
                out[wanted[i + 1]] = x
        return {layer: out[layer] for layer in layers}
    if isinstance(net, FeatureDictNet) and not net.grad_checkpointing:
        names = [name for name, _ in net.items() if name in net.return_layers]
        wanted = {names[p]: layer for p, layer in zip(positions, layers, strict=True)}
        out = {}
        x = inputs
        for name, module in net.items():
            if len(out) == len(wanted):
                break
            x = module(x)
            if name in wanted:
                out[wanted[name]] = (torch.cat(x, 1) if net.concat else x[0]) if isinstance(x, tuple | list) else x
        return {layer: out[layer] for layer in layers}
    feats = extractor(inputs)
    return {layer: feats[layer] for layer in layers}
