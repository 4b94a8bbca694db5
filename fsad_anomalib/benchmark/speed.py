"""``python -m fsad_anomalib.benchmark.speed``: CPU inference speed, side by side in one process.

Fits FewShotContrastive (frozen; fine-tuning does not change the scoring graph), PatchCore and PaDiM on
the same K-shot ELPV support set, exports FewShotContrastive to ONNX and OpenVINO, then times, interleaved
round by round, at batch 1 (ms per image) and batch 32 (images per second): the bare backbone forward (all
blocks, as timm's ``features_only`` model and so PatchCore and PaDiM run it), the backbone up to the deepest
layer FewShotContrastive scores (``blocks.4`` by default, as for PatchCore), FewShotContrastive eager (full graph:
pre-processing, model, post-processing), ONNX Runtime, OpenVINO FP32 and FP16, FewShotContrastive eager with
other arguments (``--variants``: the ELPV configs' scorings), PatchCore and PaDiM. Prints medians and ratios
to the bare backbone; ``--output`` also writes them as ``speed.md`` and bar plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fsad_anomalib.benchmark.cli import int_at_least, json_object


def _median_ms(fn: Callable[[], object], batch: int, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000 / batch)
    return out


DEFAULT_VARIANTS = [
    {"score_mode": "knn"},
    {"score_mode": "knn", "n_views": 4, "rot90": False},
    {"score_mode": "knn_patch"},
]


def _label(args: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in args.items())


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915
    """Fit, export and time every method; print a markdown table."""
    parser = argparse.ArgumentParser(prog="python -m fsad_anomalib.benchmark.speed", description=__doc__)
    parser.add_argument("--image-size", type=int_at_least(32), default=256)
    parser.add_argument("--k", type=int_at_least(1), default=4)
    parser.add_argument("--rounds", type=int_at_least(1), default=15, help="timing rounds at batch 1 (batch 32: a third)")
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="*", type=json_object, default=DEFAULT_VARIANTS,
                        help="FewShotContrastive arguments (JSON objects) timed eagerly besides the default patch "
                        "Gaussian; the defaults are the ELPV configs' scorings: knn, knn with the mono config's "
                        "4-view memory bank, knn_patch (poly)")
    parser.add_argument("--output", default=None,
                        help="folder for speed.md (the printed table) and inference_ms.png (ms per image at batch 1 "
                        "and 32 per method, the bare backbone as a dashed line)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENVINO_TELEMETRY_DISABLED", "1")
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    import onnxruntime as ort  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415
    from anomalib.models.components import TimmFeatureExtractor  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from fsad_anomalib.backbones import resolve_backbone  # noqa: PLC0415
    from fsad_anomalib.benchmark.methods import build_method  # noqa: PLC0415
    from fsad_anomalib.data import ELPV, FewShot  # noqa: PLC0415
    from fsad_anomalib.models.components.feature_extractor import features_until  # noqa: PLC0415

    size = args.image_size
    models = {}
    with tempfile.TemporaryDirectory(prefix="fsad-speed-") as work:
        variants = {f"FewShotContrastive eager, {_label(v)}": v for v in args.variants}
        for name, fsc_args in (("frozen", None), *variants.items(), ("PatchCore", None), ("PaDiM", None)):
            seed_everything(0, verbose=False)
            method = "frozen" if name in variants else name
            try:
                model = build_method(method, "offline:tf_efficientnet_lite0", size, fsc_args)
            except (TypeError, ValueError) as exc:
                parser.error(f"--variants {json.dumps(fsc_args)}: {exc}")
            engine = Engine(default_root_dir=work, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", limit_val_batches=1)
            engine.fit(model=model, datamodule=FewShot(ELPV("mono", n_test_normal=16, n_test_abnormal=16), k_shot=args.k))
            models[name] = model.eval()
        fsc = models["frozen"]
        onnx_path = fsc.to_onnx(export_root=work, input_size=None)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        core = ov.Core()
        ov_model = core.read_model(str(onnx_path))
        compiled = {
            "OpenVINO FP32": core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
            "OpenVINO default precision": core.compile_model(ov_model, "CPU"),
        }
        ov_fp16_path = os.path.join(work, "fp16.xml")
        ov.save_model(ov_model, ov_fp16_path, compress_to_fp16=True)
        compiled["OpenVINO FP16 weights"] = core.compile_model(core.read_model(ov_fp16_path), "CPU",
                                                               {"INFERENCE_PRECISION_HINT": "f32"})
        # the floor rows run FewShotContrastive's own layers: all of them, and those its scoring reads
        scored, all_layers = fsc.model.layers, [*fsc.model.layers, fsc.model.global_layer]
        backbone = TimmFeatureExtractor(resolve_backbone("offline:tf_efficientnet_lite0"), layers=all_layers,
                                        requires_grad=True).eval()
        module_of = dict(zip(backbone.layers, backbone.feature_extractor.feature_info.module_name(), strict=True))
        deepest = module_of[max(scored, key=backbone.layers.index)]

        inputs = {b: torch.rand(b, 3, size, size) for b in (1, 32)}
        name_in = session.get_inputs()[0].name
        runners: dict[str, Callable[[torch.Tensor], object]] = {
            "bare backbone forward": lambda x: backbone(x),
            f"backbone up to {deepest}": lambda x: features_until(backbone, x, scored),
            "FewShotContrastive eager": lambda x: fsc(x),
            **{name: models[name] for name in variants},
            "FewShotContrastive ONNX Runtime": lambda x: session.run(None, {name_in: x.numpy()}),
            **{name: (lambda c: (lambda x: c(x.numpy())))(c) for name, c in compiled.items()},
            "PatchCore eager": lambda x: models["PatchCore"](x),
            "PaDiM eager": lambda x: models["PaDiM"](x),
        }
        # FP16 score difference against eager FP32, on real test cells (random noise saturates the scores)
        test_set = FewShot(ELPV("mono", n_test_normal=8, n_test_abnormal=8), k_shot=args.k)
        test_set.setup()
        probe = torch.stack([
            torch.nn.functional.interpolate(test_set.test_data[i].image[None], size=(size, size), mode="bilinear",
                                            antialias=True)[0]
            for i in range(len(test_set.test_data))
        ])
        with torch.no_grad():
            eager_scores = fsc(probe).pred_score.numpy()
        ov_out = compiled["OpenVINO FP16 weights"](probe.numpy())
        fp16_scores = np.asarray(ov_out[compiled["OpenVINO FP16 weights"].output("pred_score")])
        bf16_out = compiled["OpenVINO default precision"](probe.numpy())
        bf16_scores = np.asarray(bf16_out[compiled["OpenVINO default precision"].output("pred_score")])

        timings: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in runners}
        with torch.no_grad():
            for batch in (1, 32):
                for fn in runners.values():
                    fn(inputs[batch])  # warm-up
                rounds = args.rounds if batch == 1 else max(2, args.rounds // 3)
                for _ in range(rounds):  # interleaved, so machine noise hits every method alike
                    for name, fn in runners.items():
                        timings[name][batch] += _median_ms(lambda fn=fn: fn(inputs[batch]), batch, 1)

    floor1 = statistics.median(timings["bare backbone forward"][1])
    floor32 = statistics.median(timings["bare backbone forward"][32])
    lines = [
        f"Image size {size}, K = {args.k}, torch threads {torch.get_num_threads()}, medians of interleaved rounds "
        f"({args.rounds} at batch 1, {max(2, args.rounds // 3)} at batch 32)",
        "",
        "| method | ms / image, batch 1 | time x backbone | images / s, batch 32 | time x backbone |",
        "|---|---|---|---|---|",
    ]
    for name, t in timings.items():
        b1, b32 = statistics.median(t[1]), statistics.median(t[32])
        lines.append(f"| {name} | {b1:.1f} | {b1 / floor1:.2f} | {1000 / b32:.1f} | {b32 / floor32:.2f} |")
    rel = np.abs(fp16_scores - eager_scores) / np.maximum(np.abs(eager_scores), 1e-12)
    rel_bf16 = np.abs(bf16_scores - eager_scores) / np.maximum(np.abs(eager_scores), 1e-12)
    lines += [
        "",
        f"OpenVINO FP16-weight scores vs eager FP32: max relative difference {rel.max():.2e} ({len(probe)} ELPV test cells)",
        f"OpenVINO default-precision scores vs eager FP32: max relative difference {rel_bf16.max():.2e}",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.output:
        from fsad_anomalib.benchmark.report import write_time_plot  # noqa: PLC0415

        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.md").write_text(text)
        for batch, floor in ((1, floor1), (32, floor32)):
            write_time_plot({name: statistics.median(t[batch]) for name, t in timings.items() if name != "bare backbone forward"},
                            out / f"inference_ms_batch{batch}.png", floor=floor,
                            ylabel=f"ms per image, batch {batch} (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
