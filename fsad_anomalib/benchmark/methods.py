"""Methods the benchmark compares, all on the same backbone, weights and image size."""

from __future__ import annotations

from typing import Any

from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib.metrics import AUROC, Evaluator
from anomalib.models import Padim, Patchcore
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor

from fsad_anomalib.backbones import backbone_normalization, resolve_backbone
from fsad_anomalib.fine_tuning import ContrastiveFineTuning
from fsad_anomalib.models import FewShotContrastive

__all__ = ["FSC_VARIANTS", "METHODS", "OrderPreservingPostProcessor", "build_method", "few_shot_contrastive_args",
           "method_callbacks", "ranking_components"]


class OrderPreservingPostProcessor(PostProcessor):
    """Maps scores and anomaly maps into (0, 1) with ``0.5 + 0.5 * s / (1 + |s|)``, which keeps their order.

    No statistics, so no validation pass is needed. The map matters: torchmetrics' AUROC passes scores
    outside [0, 1] through a sigmoid, which rounds every distance above about 17 to 1.0 in float32 and
    turns the ranking into ties.
    """

    def __init__(self) -> None:
        super().__init__(enable_normalization=False, enable_thresholding=False)

    def post_process_batch(self, batch) -> None:  # noqa: ANN001
        """Squash ``pred_score`` and ``anomaly_map`` in place, in float64 to keep close scores apart."""
        for field in ("pred_score", "anomaly_map"):
            value = getattr(batch, field, None)
            if value is not None:
                v = value.double()
                setattr(batch, field, (0.5 + 0.5 * v / (1 + v.abs())).to(value.dtype))


def ranking_components() -> dict[str, Any]:
    """Post-processor and evaluator for the benchmark: anomalib's AUROC, one pass over the test set.

    anomalib's default post-processor normalises scores with statistics from a validation pass, and its
    evaluator needs thresholds from it. AUROC is a ranking metric: any increasing map of the scores gives
    the same value, so the benchmark maps the scores with :class:`OrderPreservingPostProcessor` and skips
    the validation pass, which scored the same test images a second time.
    """
    return {
        "post_processor": OrderPreservingPostProcessor(),
        "evaluator": Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            ],
        ),
    }


def method_callbacks(name: str) -> list:
    """Extra Lightning callbacks of a method: contrastive fine-tuning for the "+fine-tuning" rows."""
    return [ContrastiveFineTuning()] if name.endswith("+fine-tuning") else []


# FewShotContrastive variants: the model as --model-args configures it, and the paper's ablations, which change
# its fine-tuning only (frozen: none; L_Con: NT-Xent alone; L_Con+L_PP: no synthesized negatives)
FSC_VARIANTS: dict[str, dict[str, Any] | bool] = {
    "FewShotContrastive": {},
    # the same model under another name, so that a run with other arguments (a per-set expert configuration given
    # by --set-model-args) can be tabled and compared beside the default's runs (--include-runs)
    "expert": {},
    "frozen": False,
    "L_Con": {"lambda_pp": 0.0, "synthesis": "none"},
    "L_Con+L_PP": {"synthesis": "none"},
}
METHODS = (*FSC_VARIANTS, "PatchCore", "PaDiM", "PatchCore+fine-tuning", "PaDiM+fine-tuning")


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
        msg = (f"fine_tuning must be \"auto\", true, false or an object of ContrastiveFineTuning arguments, got "
               f"{settings!r}.")
        raise ValueError(msg)
    # FewShotContrastive builds the callback from the merged arguments (as from a checkpoint's)
    args["fine_tuning"] = {**(settings if isinstance(settings, dict) else {}), **variant}
    return args


def build_method(name: str, backbone: str, image_size: int, fsc_args: dict[str, Any] | None = None):  # noqa: ANN201
    """Instantiate method ``name``; PatchCore and PaDiM get the backbone's normalisation and image size."""
    if name in FSC_VARIANTS:
        args = {"visualizer": False, **ranking_components(), **few_shot_contrastive_args(name, fsc_args)}
        return FewShotContrastive(backbone=backbone, image_size=image_size, **args)
    name = name.removesuffix("+fine-tuning")
    timm_name = resolve_backbone(backbone)
    mean, std = backbone_normalization(backbone)
    pre = PreProcessor(transform=Compose([Resize((image_size, image_size), antialias=True), Normalize(mean, std)]))
    if name == "PatchCore":
        return Patchcore(backbone=timm_name, layers=["blocks.2", "blocks.4"], pre_processor=pre, visualizer=False,
                         **ranking_components())
    if name == "PaDiM":
        return Padim(backbone=timm_name, layers=["blocks.1", "blocks.2", "blocks.4"], n_features=100, pre_processor=pre,
                     visualizer=False, **ranking_components())
    msg = f"Unknown method '{name}'. Known: {METHODS}."
    raise ValueError(msg)
