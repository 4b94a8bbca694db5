"""Methods the benchmark compares, all on the same backbone, weights and image size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomalib.metrics import AUROC, Evaluator
from anomalib.models import AnomalyDINO, Padim, Patchcore
from anomalib.models.image.anomaly_dino import torch_model as anomaly_dino_torch
from anomalib.models.image.anomaly_dino.torch_model import DINO_DEPTHS
from anomalib.models.image.padim.torch_model import _N_FEATURES_DEFAULTS
from anomalib.pre_processing import PreProcessor
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from fsad_anomalib.backbones import backbone_normalization, resolve_backbone
from fsad_anomalib.backbones.layers import default_layers, feature_layout
from fsad_anomalib.fine_tuning import ContrastiveFineTuning
from fsad_anomalib.models import FewShotContrastive
from fsad_anomalib.models.components.feature_extractor import snapped_size
from fsad_anomalib.post_processing import NormalThresholdPostProcessor

__all__ = [
    "FSC_VARIANTS",
    "METHODS",
    "STOCK",
    "OrderPreservingPostProcessor",
    "anomaly_dino",
    "anomaly_dino_encoder",
    "build_method",
    "few_shot_contrastive_args",
    "methods_on",
    "feature_layer_names",
    "method_callbacks",
    "ranking_components",
    "stock_layers",
]


class OrderPreservingPostProcessor(NormalThresholdPostProcessor):
    """The normal-only threshold of :class:`NormalThresholdPostProcessor`, with scores kept in their order.

    The threshold is set from the K training normals exactly as in deployment; the test batches' raw scores and
    labels are kept (``raw_scores``, ``gt_labels``) so that the benchmark can measure the false-reject and detection
    rates at it. Scores and anomaly maps are then mapped into (0, 1) with ``0.5 + 0.5 * s / (1 + |s|)``, which keeps
    their order: anomalib's normalisation clamps every score far above the threshold to 1, which ties anomalies,
    and torchmetrics' AUROC passes scores outside [0, 1] through a sigmoid, which rounds every distance above about
    17 to 1.0 in float32.
    """

    def __init__(self, false_reject_rate: float = 0.05) -> None:
        super().__init__(false_reject_rate=false_reject_rate, enable_normalization=False, enable_thresholding=False)
        self.raw_scores: list[float] = []
        self.gt_labels: list[int] = []

    def post_process_batch(self, batch) -> None:  # noqa: ANN001
        """Keep the raw scores and labels, then squash ``pred_score`` and ``anomaly_map`` in place (float64)."""
        if batch.pred_score is not None:
            self.raw_scores += batch.pred_score.detach().double().flatten().cpu().tolist()
            labels = batch.gt_label if batch.gt_label is not None else [-1] * batch.pred_score.shape[0]
            self.gt_labels += [int(label) for label in labels]
        for field in ("pred_score", "anomaly_map"):
            value = getattr(batch, field, None)
            if value is not None:
                v = value.double()
                setattr(batch, field, (0.5 + 0.5 * v / (1 + v.abs())).to(value.dtype))


def ranking_components(false_reject_rate: float = 0.05) -> dict[str, Any]:
    """Post-processor and evaluator for the benchmark: anomalib's AUROC, one pass over the test set.

    The post-processor sets each method's threshold from its K normals (:class:`OrderPreservingPostProcessor`);
    AUROC is a ranking metric, so any increasing map of the scores gives the same value, and the benchmark skips
    the validation pass, which scored the same test images a second time.
    """
    return {
        "post_processor": OrderPreservingPostProcessor(false_reject_rate),
        "evaluator": Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            ]
        ),
    }


def method_callbacks(name: str) -> list:
    """Extra Lightning callbacks of a method: contrastive fine-tuning for the "+fine-tuning" rows."""
    return [ContrastiveFineTuning()] if name.endswith("+fine-tuning") else []


# FewShotContrastive variants: the model as --model-args configures it, and the paper's ablations, which change
# its fine-tuning only (frozen: none; L_Con: NT-Xent alone; L_Con+L_PP: no synthesized negatives)
FSC_VARIANTS: dict[str, dict[str, Any] | bool] = {
    "FewShotContrastive": {},
    "frozen": False,
    "L_Con": {"lambda_pp": 0.0, "synthesis": "none"},
    "L_Con+L_PP": {"synthesis": "none"},
}
STOCK = ("PatchCore", "PaDiM", "AnomalyDINO")
METHODS = (*FSC_VARIANTS, *STOCK, *(f"{name}+fine-tuning" for name in STOCK))


def few_shot_contrastive_args(name: str, fsc_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """FewShotContrastive's arguments for variant ``name`` from the JSON ``fsc_args``.

    ``fsc_args["fine_tuning"]`` may be ``"auto"`` (the default: the model decides), ``true``, ``false`` or an object
    of :class:`~fsad_anomalib.fine_tuning.ContrastiveFineTuning` arguments; the variant's fine-tuning settings go
    over it (an ablation under ``"auto"`` fine-tunes with its own settings).

    Raises:
        ValueError: An ablation asks for fine-tuning that ``fsc_args`` switches off.
    """
    args = dict(fsc_args or {})
    variant = FSC_VARIANTS[name]
    settings = args.pop("fine_tuning", "auto")
    if variant is False:
        args["fine_tuning"] = False
        return args
    if settings is False:
        if variant:
            msg = f"method {name} fine-tunes, and the model arguments say fine_tuning: false."
            raise ValueError(msg)
        args["fine_tuning"] = False
        return args
    if settings == "auto":
        if not variant:  # the model decides whether fine-tuning helps
            args["fine_tuning"] = "auto"
            return args
        settings = True  # an ablation fine-tunes in its own way
    if settings is not True and not isinstance(settings, dict):
        msg = (
            f'fine_tuning must be "auto", true, false or an object of ContrastiveFineTuning arguments, got '
            f"{settings!r}."
        )
        raise ValueError(msg)
    # FewShotContrastive builds the callback from the merged arguments (as from a checkpoint's)
    args["fine_tuning"] = {**(settings if isinstance(settings, dict) else {}), **variant}
    return args


def feature_layer_names(backbone: str) -> tuple[str, ...]:
    """The module names of a timm backbone's feature depths (``feature_info``; a ViT's blocks), shallow to deep.

    ``resnet18``: ``act1, layer1, layer2, layer3, layer4``; EfficientNet-Lite0: ``blocks.0, blocks.1, blocks.2,
    blocks.4, blocks.6``. ``offline:`` names and ``local-dir:`` folders are read from their config.

    Raises:
        ValueError: ``backbone`` is not a timm model with feature maps.
    """
    try:
        return feature_layout(backbone).names
    except ValueError as exc:
        msg = f"--backbone {backbone}: {exc}"
        raise ValueError(msg) from exc


def stock_layers(backbone: str, layers: Sequence[int | str] | str | None = None) -> dict[str, list[str]]:
    """PatchCore's and PaDiM's layers on ``backbone``: FewShotContrastive's feature depths, by name.

    PatchCore reads FewShotContrastive's patch layers (``layers``, timm feature depths or module names; default and
    ``"auto"``: the stride-8 and stride-16 stages, anomalib's ``layer2, layer3`` on a ResNet and ``blocks.2,
    blocks.4`` on EfficientNet-Lite0; a ViT's blocks at half and three quarters of its depth); PaDiM one depth
    shallower as well (``layer1, layer2, layer3``, its anomalib default on a ResNet). The names are resolved through
    timm's ``feature_info`` (:func:`~fsad_anomalib.backbones.layers.feature_layout`), so any timm CNN works.

    Raises:
        ValueError: A depth or name the backbone does not have.
    """
    names = list(feature_layer_names(backbone))
    wanted = default_layers(backbone)[0] if layers is None or isinstance(layers, str) else list(layers)
    depths = []
    for layer in wanted:
        if isinstance(layer, int) and 0 <= layer < len(names):
            depths.append(layer)
        elif isinstance(layer, str) and layer in names:
            depths.append(names.index(layer))
        else:
            msg = (
                f"layer {layer!r} is not a feature depth of {backbone}: it has depths 0-{len(names) - 1} "
                f"({', '.join(names)})."
            )
            raise ValueError(msg)
    depths = sorted(set(depths))
    padim = sorted({max(depths[0] - 1, 0), *depths})
    return {"PatchCore": [names[d] for d in depths], "PaDiM": [names[d] for d in padim]}


def build_method(  # noqa: ANN201
    name: str,
    backbone: str,
    image_size: int,
    fsc_args: dict[str, Any] | None = None,
    false_reject_rate: float = 0.05,
    pre_trained: bool = True,
):
    """Instantiate method ``name`` of the benchmark.

    PatchCore and PaDiM get the backbone's normalisation and image size, and
    FewShotContrastive's feature depths (:func:`stock_layers`).

    Every method's threshold comes from its K normals at ``false_reject_rate``. ``pre_trained=False``: random
    weights for every method (no download; for tests and smoke runs).
    """
    components = ranking_components(false_reject_rate)
    if name in FSC_VARIANTS:
        args = {"visualizer": False, **components, **few_shot_contrastive_args(name, fsc_args)}
        return FewShotContrastive(backbone=backbone, image_size=image_size, pre_trained=pre_trained, **args)
    name = name.removesuffix("+fine-tuning")
    if name not in STOCK:
        msg = f"Unknown method '{name}'. Known: {METHODS}."
        raise ValueError(msg)
    timm_name = resolve_backbone(backbone)
    mean, std = backbone_normalization(backbone)
    size = snapped_size((image_size, image_size), feature_layout(backbone).patch_size)  # a ViT's: its patch multiple
    pre = PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean, std)]))
    if name == "AnomalyDINO":
        return anomaly_dino(timm_name, pre_trained, pre_processor=pre, visualizer=False, **components)
    layers = stock_layers(backbone, (fsc_args or {}).get("layers"))[name]
    if name == "PatchCore":
        return Patchcore(
            backbone=timm_name,
            layers=layers,
            pre_trained=pre_trained,
            pre_processor=pre,
            visualizer=False,
            **components,
        )
    n_features = _padim_features(backbone, layers)
    return Padim(
        backbone=timm_name,
        layers=layers,
        pre_trained=pre_trained,
        n_features=n_features,
        pre_processor=pre,
        visualizer=False,
        **components,
    )


def anomaly_dino_encoder(backbone: str) -> str:
    """The timm name AnomalyDINO takes for ``backbone``.

    Raises:
        ValueError: ``backbone`` is not a DINOv2 ViT AnomalyDINO knows (it reads the last block of the sizes in
            ``DINO_DEPTHS``).
    """
    encoder = resolve_backbone(backbone)
    if "dino" not in encoder or not any(size in encoder for size in DINO_DEPTHS):
        msg = (
            f"AnomalyDINO runs on DINOv2 ViTs only (--backbone vit_small_patch14_dinov2, or another of the "
            f"{', '.join(DINO_DEPTHS)} sizes), not on '{backbone}'."
        )
        raise ValueError(msg)
    return encoder


def methods_on(backbone: str, methods: list[str]) -> tuple[list[str], str]:
    """``methods`` that run on ``backbone`` (AnomalyDINO on DINOv2 ViTs only), and why the others do not, or ""."""
    dino = [method for method in methods if method.removesuffix("+fine-tuning") == "AnomalyDINO"]
    try:
        if dino:
            anomaly_dino_encoder(backbone)
    except ValueError as exc:
        return [method for method in methods if method not in dino], f"{', '.join(dino)} skipped: {exc}"
    return methods, ""


def anomaly_dino(encoder: str, pre_trained: bool = True, **kwargs: Any) -> AnomalyDINO:  # noqa: ANN401
    """Anomalib's AnomalyDINO on the DINOv2 ViT ``encoder`` (random weights with ``pre_trained=False``).

    AnomalyDINO always asks timm for pretrained weights; without them (tests, smoke runs) its extractor is built with
    random ones.

    Raises:
        ValueError: ``encoder`` is not a DINOv2 ViT AnomalyDINO knows (it reads the last block of the sizes in
            ``DINO_DEPTHS``).
    """
    encoder = anomaly_dino_encoder(encoder)
    if pre_trained:
        return AnomalyDINO(encoder_name=encoder, **kwargs)
    built = anomaly_dino_torch.TimmFeatureExtractor

    def random_weights(*args: Any, **options: Any) -> nn.Module:  # noqa: ANN401 - TimmFeatureExtractor's own
        return built(*args, **{**options, "pre_trained": False})

    anomaly_dino_torch.TimmFeatureExtractor = random_weights
    try:
        return AnomalyDINO(encoder_name=encoder, **kwargs)
    finally:
        anomaly_dino_torch.TimmFeatureExtractor = built


def _padim_features(backbone: str, layers: list[str]) -> int:
    """PaDiM's ``n_features`` on ``layers`` of ``backbone``.

    Anomalib's own choice for its backbones (100 on resnet18, 550 on wide_resnet50_2),
    else 100, and never more than the layers' channels hold together.
    """
    layout = feature_layout(backbone)
    total = sum(layout.channels[layout.names.index(layer)] for layer in layers)
    return min(_N_FEATURES_DEFAULTS.get(resolve_backbone(backbone), 100), total)
