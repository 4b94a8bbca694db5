"""Few-shot benchmark: every method on the same K-shot support sets, in one process.

Each run (dataset, category, K, seed, method) appends one JSON line to ``runs.jsonl`` in the output
folder; a run already there is skipped, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything

from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.engine import Engine

from fsad_anomalib.backbones import resolve_backbone
from fsad_anomalib.benchmark.methods import FSC_VARIANTS, METHODS, build_method, method_callbacks
from fsad_anomalib.benchmark.sets import test_label_counts
from fsad_anomalib.data import FewShot

logger = logging.getLogger(__name__)

__all__ = ["RECORDED_RATES", "NonFiniteScoreCounter", "decision_rates", "load_runs", "merge_runs", "oracle_f1_threshold",
           "peak_rss_mb", "run_benchmark", "threshold_record", "time_forward"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trim_heap() -> None:
    """Give freed heap back to the OS (anomalib's k-center-greedy coreset in PatchCore fragments glibc's heap)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


@torch.no_grad()
def time_forward(
    fn: Callable[[torch.Tensor], Any], batch: int, image_size: int, repeats: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Median milliseconds per image of ``fn`` on random images of ``batch`` x 3 x size x size on ``device``."""
    device = torch.device(device)
    x = torch.rand(batch, 3, image_size, image_size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - start) * 1000 / batch)
    return statistics.median(times)


def backbone_floor(backbone: str, image_size: int, repeats: int = 7) -> dict[str, float]:
    """Bare backbone forward (timm features, no scoring): the floor for every method using it."""
    import timm  # noqa: PLC0415

    net = timm.create_model(resolve_backbone(backbone), pretrained=True, features_only=True, exportable=True).eval()
    return {
        "ms_b1": time_forward(net, 1, image_size, repeats),
        "ms_b32": time_forward(net, 32, image_size, max(2, repeats // 3)),
    }


class NonFiniteScoreCounter(Callback):
    """Counts test images whose score (or anomaly map) is NaN or infinite.

    torchmetrics' AUROC takes NaN scores without complaint and returns a number (stock PaDiM at K = 1,
    whose per-patch covariance of a single sample is NaN, scored 0.299 that way). The benchmark records
    NaN for such a run instead, with the count of the images concerned.
    """

    def __init__(self) -> None:
        self.scores = 0
        self.maps = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002, PLR0913
        """Count the batch's images with a non-finite score or map."""
        score = getattr(outputs, "pred_score", None)
        if score is not None:
            self.scores += int((~torch.isfinite(score.reshape(score.shape[0], -1))).any(dim=1).sum())
        anomaly_map = getattr(outputs, "anomaly_map", None)
        if anomaly_map is not None:
            self.maps += int((~torch.isfinite(anomaly_map.reshape(anomaly_map.shape[0], -1))).any(dim=1).sum())


def load_runs(output: str | Path) -> list[dict[str, Any]]:
    """The rows of ``output/runs.jsonl`` (none when the file does not exist)."""
    runs_file = Path(output) / "runs.jsonl"
    if not runs_file.exists():
        return []
    return [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]


def _key(row: dict[str, Any]) -> tuple:
    return (row["dataset"], row["category"], row["k_shot"], row["seed"], row["method"])


def merge_runs(rows: list[dict[str, Any]], *others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus the rows of ``others`` whose run (set, K, seed, method) none before them holds."""
    merged = list(rows)
    seen = {_key(r) for r in merged}
    for other in others:
        for row in other:
            if _key(row) not in seen:
                seen.add(_key(row))
                merged.append(row)
    return merged


def decision_rates(scores: list[float], labels: list[int], threshold: float) -> dict[str, float]:
    """False-reject rate on the normals (label 0) and detection rate on the anomalies (label 1) of ``score >
    threshold``, the decision anomalib's post-processor makes; NaN where the threshold or a class is missing."""
    normal = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    anomalous = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    finite = threshold is not None and math.isfinite(threshold)

    def rate(values: list[float]) -> float:
        return sum(v > threshold for v in values) / len(values) if finite and values else float("nan")

    return {"false_reject_rate": rate(normal), "detection_rate": rate(anomalous)}


def oracle_f1_threshold(scores: list[float], labels: list[int]) -> float:
    """anomalib's F1-adaptive threshold learned on these (test) scores and labels: the best F1 they allow."""
    from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold  # noqa: PLC0415

    pairs = [(s, y) for s, y in zip(scores, labels, strict=True) if y in (0, 1) and math.isfinite(s)]
    if not pairs or len({y for _, y in pairs}) < 2:  # noqa: PLR2004
        return float("nan")
    metric = _F1AdaptiveThreshold()
    metric.update(torch.tensor([s for s, _ in pairs], dtype=torch.float64), torch.tensor([y for _, y in pairs]))
    return float(metric.compute())


# besides the run's own target, every run records what the same held-out evidence gives at these targets
RECORDED_RATES = (0.01, 0.05)


def threshold_record(post_processor: Any, target: float) -> dict[str, Any]:  # noqa: ANN401
    """What a run's normal-only threshold does on the test set, beside anomalib's oracle F1 threshold.

    ``at`` holds the threshold and the two rates at each of ``RECORDED_RATES`` and ``target``, all from the same
    held-out evidence (:meth:`NormalThresholdPostProcessor.threshold_at`), so one run measures several targets.
    """
    scores = list(getattr(post_processor, "raw_scores", []))
    labels = list(getattr(post_processor, "gt_labels", []))
    threshold = float(post_processor._image_threshold) if post_processor is not None else float("nan")  # noqa: SLF001
    oracle = oracle_f1_threshold(scores, labels)
    own, best = decision_rates(scores, labels, threshold), decision_rates(scores, labels, oracle)
    at = {}
    for rate in sorted({*RECORDED_RATES, target}):
        try:
            value = float(post_processor.threshold_at(rate)) if rate != target else threshold
        except (AttributeError, ValueError):
            value = float("nan")
        at[f"{rate:g}"] = {"threshold": value, **decision_rates(scores, labels, value)}
    return {"target_false_reject_rate": target, "threshold": threshold, "false_reject_rate": own["false_reject_rate"],
            "detection_rate": own["detection_rate"], "oracle_threshold": oracle,
            "oracle_false_reject_rate": best["false_reject_rate"], "oracle_detection_rate": best["detection_rate"],
            "at": at}  # fmt: skip


def run_benchmark(
    datamodules: dict[str, Callable[[], AnomalibDataModule]],
    k_shots: Iterable[int] = (1, 2, 4, 8, 16),
    seeds: Iterable[int] = (0, 1, 2),
    methods: Iterable[str] = METHODS,
    output: str | Path = "benchmark_results",
    backbone: str = "offline:tf_efficientnet_lite0",
    image_size: int = 256,
    fsc_args: dict[str, Any] | None = None,
    time_inference: bool = True,
    set_fsc_args: dict[str, dict[str, Any]] | None = None,
    accelerator: str = "auto",
    progress: Callable[[str], None] = print,
    false_reject_rate: float = 0.05,
) -> list[dict[str, Any]]:
    """Run every (datamodule, K, seed, method) not yet in ``output/runs.jsonl`` and return all rows.

    ``fsc_args`` go to every FewShotContrastive variant; ``set_fsc_args[label]`` override them on one set.
    Each run trains and tests on one device of ``accelerator`` (Lightning's name: ``auto``, ``cpu``, ``gpu``);
    spread a large sweep by giving each process its own ``--sets`` or ``--seeds`` and output folder.
    Each row records the arguments its model was built with, and what its threshold, set from the K normals at
    ``false_reject_rate``, does on the test set (beside anomalib's oracle F1 threshold learned on it).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    runs_file = output / "runs.jsonl"
    rows = load_runs(output)
    done = {_key(r) for r in rows}
    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            msg = f"Unknown method '{method}'. Known: {METHODS}."
            raise ValueError(msg)
    plan = [(label, k, s, m) for label in datamodules for k in k_shots for s in seeds for m in methods]
    keys = [(*label.partition("/")[::2], k, s, m) for label, k, s, m in plan]  # (dataset, category, K, seed, method)
    floor_file = output / "backbone_floor.json"
    if time_inference and not floor_file.exists():
        floor_file.write_text(json.dumps(backbone_floor(backbone, image_size), indent=2))
    todo = sum(1 for key in keys if key not in done)
    if len(plan) > todo:
        progress(f"{len(plan) - todo} of {len(plan)} runs are already in {runs_file}; {todo} to run")
    started, finished = time.perf_counter(), 0
    for index, ((label, k_shot, seed, method), key) in enumerate(zip(plan, keys, strict=True), 1):
        dataset, category = key[:2]
        if key in done:
            continue
        progress(f"[{index}/{len(plan)}] {label} K={k_shot} seed={seed} {method}")
        args = {**(fsc_args or {}), **(set_fsc_args or {}).get(label, {})}
        row = _run_one(datamodules[label](), dataset, category, k_shot, seed, method, backbone, image_size, args,
                       time_inference, accelerator, false_reject_rate)
        rows.append(row)
        with runs_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if row["non_finite_scores"] or row["non_finite_maps"]:
            progress(f"    {method} gave non-finite scores on {row['non_finite_scores']} and non-finite maps on "
                     f"{row['non_finite_maps']} test images: AUROC recorded as NaN")
        finished += 1
        elapsed = time.perf_counter() - started
        left = f", about {_duration(elapsed / finished * (todo - finished))} left" if finished < todo else ""
        rates = row["threshold"]
        progress(f"    image AUROC {row['image_AUROC']:.3f}  false rejects {rates['false_reject_rate']:.1%}  detected "
                 f"{rates['detection_rate']:.1%}  train {row['train_s']:.1f}s  peak RSS {row['peak_rss_mb']:.0f} MiB"
                 f"  ({finished}/{todo} done in {_duration(elapsed)}{left})")
        _trim_heap()
    return rows


def _duration(seconds: float) -> str:
    """``seconds`` as '40 s', '12 min' or '2 h 05 min'."""
    if seconds < 60:  # noqa: PLR2004
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"  # noqa: PLR2004


def _run_one(
    datamodule: AnomalibDataModule,
    dataset: str,
    category: str,
    k_shot: int,
    seed: int,
    method: str,
    backbone: str,
    image_size: int,
    fsc_args: dict[str, Any] | None,
    time_inference: bool,
    accelerator: str = "auto",
    false_reject_rate: float = 0.05,
) -> dict[str, Any]:
    seed_everything(seed, verbose=False)
    few_shot = FewShot(datamodule, k_shot=k_shot, seed=seed)
    model = build_method(method, backbone, image_size, fsc_args, false_reject_rate)
    with tempfile.TemporaryDirectory(prefix="fsad-bench-") as workdir:
        engine = Engine(default_root_dir=workdir, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator=accelerator, devices=1, callbacks=[*method_callbacks(method), counter := NonFiniteScoreCounter()])
        start = time.perf_counter()
        engine.fit(model=model, datamodule=few_shot)
        train_s = time.perf_counter() - start
        metrics = engine.test(model=model, datamodule=few_shot, verbose=False)[0]
    test_normal, test_anomalous = test_label_counts(few_shot)
    row: dict[str, Any] = {
        "dataset": dataset,
        "category": category,
        "k_shot": k_shot,
        "seed": seed,
        "method": method,
        "evaluation": getattr(datamodule, "evaluation", "test"),
        "image_AUROC": float(metrics.get("image_AUROC", float("nan"))) if not counter.scores else float("nan"),
        "pixel_AUROC": (float(metrics["pixel_AUROC"]) if not counter.maps else float("nan"))
        if "pixel_AUROC" in metrics else None,
        "non_finite_scores": counter.scores,
        "non_finite_maps": counter.maps,
        "train_s": train_s,
        "test_normal": test_normal,
        "test_anomalous": test_anomalous,
        "support_set": few_shot.support_set,
        "model_args": (fsc_args or {}) if method in FSC_VARIANTS else {},
        "threshold": threshold_record(model.post_processor, false_reject_rate),
    }
    record = getattr(model, "self_configuration", None)
    if record:  # FewShotContrastive: what it chose from the K normals, and the fine-tuning decision's evidence
        decision = {k: v for k, v in record.get("fine_tuning", {}).items() if k != "families"}
        row["self_configuration"] = {"chosen": record.get("chosen"), "fine_tuning": decision or None}
    if time_inference:
        model.eval()
        device = next(model.parameters()).device
        row["ms_b1"] = time_forward(model, 1, image_size, device=device)
        row["ms_b32"] = time_forward(model, 32, image_size, repeats=2, device=device)
    row["peak_rss_mb"] = peak_rss_mb()
    return row
