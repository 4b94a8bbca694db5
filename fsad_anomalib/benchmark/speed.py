"""``python -m fsad_anomalib.benchmark.speed``: CPU inference speed of the model as configured, side by side.

Trains FewShotContrastive as it is configured (the default, fine-tuning ``"auto"`` included; or ``--model-args``,
or the model section of a ``--config`` file), PatchCore and PaDiM on the same K-shot support set of ``--set``, on
``--backbone``; exports FewShotContrastive to ONNX and OpenVINO; then times, interleaved round by round
(``torch.utils.benchmark.Timer``), at batch 1 (ms per image) and batch 32: the bare backbone forward (all the
layers the model reads, as timm's ``features_only`` model runs them), the backbone up to the deepest layer the
model scores, FewShotContrastive eager (pre-processing, model, post-processing), ONNX Runtime, OpenVINO (as
exported), PatchCore and PaDiM. Prints medians and ratios to the bare backbone and the largest score difference
of each exported model against eager; ``--output`` also writes them as ``speed.md`` and bar plots.

Examples:
    python -m fsad_anomalib.benchmark.speed
    python -m fsad_anomalib.benchmark.speed --set Textile/local --config configs/few_shot_contrastive_textile.yaml
    python -m fsad_anomalib.benchmark.speed --backbone resnet18 --no-pretrained --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from anomalib.engine import Engine
from anomalib.models.components import TimmFeatureExtractor
from lightning.pytorch import seed_everything
from torch.utils.benchmark import Timer

from fsad_anomalib.backbones import resolve_backbone
from fsad_anomalib.benchmark.cli import int_at_least, json_object
from fsad_anomalib.benchmark.method_config import MethodConfig
from fsad_anomalib.benchmark.methods import build_method
from fsad_anomalib.benchmark.report import write_time_plot
from fsad_anomalib.benchmark.sets import SETS_HELP, builtin_datamodule
from fsad_anomalib.data import FewShot
from fsad_anomalib.models.components.feature_extractor import features_until

FLOOR = "bare backbone forward"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fsad_anomalib.benchmark.speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--set", default="ELPV/mono", help=f"the support set's source: {SETS_HELP}")
    parser.add_argument("--backbone", default="offline:tf_efficientnet_lite0", help="any timm CNN or offline:<arch>")
    parser.add_argument("--no-pretrained", action="store_true", help="random backbone weights (no download)")
    parser.add_argument("--model-args", type=json_object, default=None, help="FewShotContrastive's arguments (JSON)")
    parser.add_argument("--config", default=None, help="a training config whose model section is timed instead")
    parser.add_argument("--image-size", type=int_at_least(32), default=256)
    parser.add_argument("--k", type=int_at_least(1), default=4)
    parser.add_argument(
        "--rounds", type=int_at_least(1), default=15, help="timing rounds at batch 1 (batch 32: a third)"
    )
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mvtec-root", default="./datasets/MVTecAD")
    parser.add_argument("--visa-root", default="./datasets/visa")
    parser.add_argument("--output", default=None, help="folder for speed.md and inference_ms_batch{1,32}.png")
    return parser


def _trained(args: argparse.Namespace, work: str, error: Callable[[str], None]) -> dict[str, torch.nn.Module]:
    """FewShotContrastive as configured, PatchCore and PaDiM, trained on one support set."""
    models = {}
    args.eval_batch_size, args.evaluation = 32, "test"
    for name in ("FewShotContrastive", "PatchCore", "PaDiM"):
        seed_everything(0, verbose=False)
        try:
            if name == "FewShotContrastive" and args.config:
                model = MethodConfig(name, args.config).build()
            else:
                model = build_method(
                    name, args.backbone, args.image_size, args.model_args, pre_trained=not args.no_pretrained
                )
            datamodule = FewShot(builtin_datamodule(args.set, args), k_shot=args.k)
        except (TypeError, ValueError) as exc:
            error(str(exc))
        engine = Engine(
            default_root_dir=work,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        engine.fit(model=model, datamodule=datamodule)
        models[name] = model.eval()
    return models


def _exported(fsc: torch.nn.Module, work: str) -> dict[str, Callable[[torch.Tensor], np.ndarray]]:
    """ONNX Runtime and OpenVINO (at its defaults) on FewShotContrastive's exported graphs: x -> image scores."""
    onnx_path = fsc.to_onnx(export_root=Path(work) / "onnx", input_size=None)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name_in = session.get_inputs()[0].name
    xml = fsc.to_openvino(export_root=Path(work) / "openvino", input_size=None)
    compiled = ov.Core().compile_model(str(xml), "CPU")
    return {
        "FewShotContrastive ONNX Runtime": lambda x: session.run(["pred_score"], {name_in: x.numpy()})[0],
        "FewShotContrastive OpenVINO": lambda x: np.asarray(compiled(x.numpy())[compiled.output("pred_score")]),
    }


def main(argv: list[str] | None = None) -> int:
    """Train, export and time every method; print a markdown table."""
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENVINO_TELEMETRY_DISABLED", "1")
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size
    with tempfile.TemporaryDirectory(prefix="fsad-speed-") as work:
        models = _trained(args, work, parser.error)
        fsc = models["FewShotContrastive"]
        exported = _exported(fsc, work)
        # the floor rows read FewShotContrastive's own layers: all of them, and those its scoring reads
        scored, all_layers = fsc.model.layers, [*fsc.model.layers, fsc.model.global_layer]
        backbone = TimmFeatureExtractor(
            resolve_backbone(args.backbone), layers=all_layers, requires_grad=True, pre_trained=False
        ).eval()
        module_of = dict(zip(backbone.layers, backbone.feature_extractor.feature_info.module_name(), strict=True))
        deepest = module_of[max(scored, key=backbone.layers.index)]
        runners: dict[str, Callable[[torch.Tensor], object]] = {
            FLOOR: backbone,
            f"backbone up to {deepest}": lambda x: features_until(backbone, x, scored),
            "FewShotContrastive eager": fsc,
            **exported,
            "PatchCore eager": models["PatchCore"],
            "PaDiM eager": models["PaDiM"],
        }
        inputs = {b: torch.rand(b, 3, size, size) for b in (1, 32)}
        with torch.no_grad():
            eager = fsc(inputs[32]).pred_score.numpy()
            scale = np.maximum(np.abs(eager), 1e-12)
            differences = {
                name: float(np.max(np.abs(run(inputs[32]).ravel() - eager) / scale)) for name, run in exported.items()
            }
            timings: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in runners}
            for batch in (1, 32):
                timers = {
                    name: Timer("run(x)", globals={"run": run, "x": inputs[batch]}) for name, run in runners.items()
                }
                for timer in timers.values():
                    timer.timeit(1)  # warm-up
                for _ in range(args.rounds if batch == 1 else max(2, args.rounds // 3)):
                    for name, timer in timers.items():  # interleaved, so machine noise hits every method alike
                        timings[name][batch].append(timer.timeit(1).median * 1000 / batch)
    text = _table(args, timings, differences)
    print("\n" + text)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.md").write_text(text, encoding="utf-8")
        for batch in (1, 32):
            write_time_plot(
                {name: statistics.median(t[batch]) for name, t in timings.items() if name != FLOOR},
                out / f"inference_ms_batch{batch}.png",
                floor=statistics.median(timings[FLOOR][batch]),
                ylabel=f"ms per image, batch {batch} (median)",
            )
    return 0


def _table(args: argparse.Namespace, timings: dict[str, dict[int, list[float]]], differences: dict[str, float]) -> str:
    floor1, floor32 = (statistics.median(timings[FLOOR][batch]) for batch in (1, 32))
    lines = [
        (
            f"{args.set}, K = {args.k}, backbone {args.backbone}, image size {args.image_size}, torch threads "
            f"{torch.get_num_threads()}; medians of interleaved rounds ({args.rounds} at batch 1, "
            f"{max(2, args.rounds // 3)} at batch 32)"
        ),
        "",
        "| method | ms / image, batch 1 | time x backbone | images / s, batch 32 | time x backbone |",
        "|---|---|---|---|---|",
    ]
    for name, t in timings.items():
        b1, b32 = statistics.median(t[1]), statistics.median(t[32])
        lines.append(f"| {name} | {b1:.1f} | {b1 / floor1:.2f} | {1000 / b32:.1f} | {b32 / floor32:.2f} |")
    lines.append("")
    lines += [
        f"{name} scores vs eager: max relative difference {value:.2e} (32 random images)"
        for name, value in differences.items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
