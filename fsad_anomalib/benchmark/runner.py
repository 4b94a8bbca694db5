"""Few-shot benchmark: every method on the same K-shot support sets.

Each run (dataset, category, K, seed, method) appends one JSON line to ``runs.jsonl`` in the output
folder; a run already there is skipped, so an interrupted benchmark resumes where it stopped. Runs execute one
after another in this process, or as Ray tasks, each in a worker process of its own
(:mod:`fsad_anomalib.benchmark.executors`).
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import timm
import torch
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from torch.utils.benchmark import Timer

from fsad_anomalib.backbones import resolve_backbone
from fsad_anomalib.backbones.layers import feature_layout
from fsad_anomalib.benchmark.executors import EXECUTORS, Task, ray_executor, serial_executor
from fsad_anomalib.benchmark.methods import FSC_VARIANTS, METHODS, build_method, method_callbacks
from fsad_anomalib.benchmark.sets import test_label_counts
from fsad_anomalib.benchmark.thresholds import confirmation_record, growth_record, threshold_record
from fsad_anomalib.data import FewShot
from fsad_anomalib.models.components.feature_extractor import snapped_size

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteScoreCounter",
    "load_runs",
    "merge_runs",
    "peak_rss_mb",
    "run_benchmark",
    "run_one",
    "time_forward",
]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def time_forward(
    fn: Callable[[torch.Tensor], Any], batch: int, image_size: int, repeats: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Median milliseconds per image of ``fn``.

    On random images of ``batch`` x 3 x size x size on ``device``
    (``torch.utils.benchmark.Timer``, which synchronises CUDA).
    """
    timer = Timer("fn(x)", globals={"fn": fn, "x": torch.rand(batch, 3, image_size, image_size, device=device)})
    timer.timeit(1)  # warm-up
    return statistics.median(timer.timeit(1).median * 1000 / batch for _ in range(repeats))


def backbone_floor(backbone: str, image_size: int, repeats: int = 7) -> dict[str, float]:
    """Bare backbone forward (timm features, no scoring): the floor for every method using it.

    A ViT runs whole, on the image size snapped to its patch size (as the methods run it).
    """
    # the time does not depend on the weights: random ones, never a download
    patch = feature_layout(backbone).patch_size
    size = snapped_size((image_size, image_size), patch)[0]
    options = {"dynamic_img_size": True} if patch > 1 else {"features_only": True, "exportable": True}
    net = timm.create_model(resolve_backbone(backbone), pretrained=False, **options).eval()
    return {"ms_b1": time_forward(net, 1, size, repeats), "ms_b32": time_forward(net, 32, size, max(2, repeats // 3))}


class NonFiniteScoreCounter(Callback):
    """Counts test images whose score (or anomaly map) is NaN or infinite.

    torchmetrics' AUROC takes NaN scores without complaint and returns a number (stock PaDiM at K = 1, whose
    per-patch covariance of a single sample is NaN). The benchmark records NaN for such a run instead, with the
    count of the images concerned.
    """

    def __init__(self) -> None:
        self.scores = 0
        self.maps = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
        """Count the batch's images with a non-finite score or map."""
        score = getattr(outputs, "pred_score", None)
        if score is not None:
            self.scores += int((~torch.isfinite(score.reshape(score.shape[0], -1))).any(dim=1).sum())
        anomaly_map = getattr(outputs, "anomaly_map", None)
        if anomaly_map is not None:
            self.maps += int((~torch.isfinite(anomaly_map.reshape(anomaly_map.shape[0], -1))).any(dim=1).sum())


def load_runs(output: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of ``output/runs.jsonl`` (none when the file does not exist).

    A last line cut short (a sweep killed while writing it) is left out with a warning; ``repair=True`` also
    removes it from the file, so that the next row starts on a line of its own. Any other line that is not JSON
    is a ``ValueError`` naming the file and line.
    """
    runs_file = Path(output) / "runs.jsonl"
    if not runs_file.exists():
        return []
    text = runs_file.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                logger.warning(
                    "%s: its last line was cut short (a sweep stopped while writing it) and is left out; "
                    "that run runs again.",
                    runs_file,
                )
                if repair:
                    runs_file.write_text("".join(f"{kept}\n" for kept in lines[:-1]))
                break
            msg = f"{runs_file}, line {number}: not a JSON row ({exc})."
            raise ValueError(msg) from exc
    return rows


def run_key(row: dict[str, Any]) -> tuple:
    """A run's key in ``runs.jsonl``: (dataset, category, K, seed, method)."""
    return (row["dataset"], row["category"], row["k_shot"], row["seed"], row["method"])


def merge_runs(rows: list[dict[str, Any]], *others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus the rows of ``others`` whose run (set, K, seed, method) none before them holds."""
    merged = list(rows)
    seen = {run_key(r) for r in merged}
    for other in others:
        for row in other:
            if run_key(row) not in seen:
                seen.add(run_key(row))
                merged.append(row)
    return merged


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
    pre_trained: bool = True,
    method_configs: dict[str, Any] | None = None,
    executor: str = "serial",
    ray_address: str | None = None,
    cpus_per_run: int | None = None,
    confirm: int = 0,
    grow: bool = False,
    held_elsewhere: Iterable[tuple] = (),
) -> list[dict[str, Any]]:
    """Run every (datamodule, K, seed, method) not yet in ``output/runs.jsonl`` and return all rows.

    Runs whose key (:func:`run_key`) is in ``held_elsewhere`` (the runs of other output folders that the report
    takes in) are not run either.
    ``fsc_args`` go to every FewShotContrastive variant; ``set_fsc_args[label]`` override them on one set.
    ``method_configs`` maps a method name to a :class:`~fsad_anomalib.benchmark.method_config.MethodConfig` (any
    anomalib model); ``methods`` may name them beside the built-in ones. Each run trains and tests on one device
    of ``accelerator`` (Lightning's name: ``auto``, ``cpu``, ``gpu``): one after another in this process
    (``executor="serial"``) or as Ray tasks, each in a process of its own (``"ray"``, on the cluster at
    ``ray_address``, else a local one; see :mod:`fsad_anomalib.benchmark.executors`). ``cpus_per_run``: torch
    threads of each run (and a Ray task's CPUs);
    rows are the same on both executors for the same value. This process alone writes ``runs.jsonl``; a run that
    fails is recorded with its error (and run again on resume) and the sweep goes on.
    Each row records the arguments its model was built with, and what its threshold, set from the K normals at
    ``false_reject_rate``, does on the test set (beside anomalib's oracle F1 threshold learned on it). With
    ``confirm=N`` the threshold is then confirmed on N further normals of the training pool (never the support set or
    the test set; :func:`fsad_anomalib.confirm.confirm`) and its rates on the same test scores are recorded too.
    With ``grow`` as well, the model then grows by those N normals (``confirm(..., grow=True)``) and is tested again:
    its AUROC and rates are recorded under ``grown``.
    """
    if executor not in EXECUTORS:
        msg = f"executor must be one of {EXECUTORS}, got '{executor}'."
        raise ValueError(msg)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    runs_file = output / "runs.jsonl"
    rows = load_runs(output, repair=True)
    done = {run_key(r) for r in rows if "error" not in r}
    methods = list(methods)
    method_configs = dict(method_configs or {})
    for method in methods:
        if method not in METHODS and method not in method_configs:
            msg = f"Unknown method '{method}'. Known: {(*METHODS, *method_configs)}."
            raise ValueError(msg)
    plan = [
        Task(
            label,
            datamodules[label],
            k,
            s,
            m,
            backbone,
            image_size,
            {**(fsc_args or {}), **(set_fsc_args or {}).get(label, {})},
            time_inference,
            accelerator,
            false_reject_rate,
            pre_trained,
            method_configs.get(m),
            cpus_per_run,
            confirm,
            grow,
        )
        for label in datamodules
        for k in k_shots
        for s in seeds
        for m in methods
    ]
    floor_file = output / "backbone_floor.json"
    if time_inference and not floor_file.exists():
        floor_file.write_text(json.dumps(backbone_floor(backbone, image_size), indent=2))
    elsewhere = set(held_elsewhere) - done
    todo = [task for task in plan if task.key not in done and task.key not in elsewhere]
    if len(plan) > len(todo):
        there = sum(task.key in done for task in plan)
        held = len(plan) - len(todo) - there
        others = f" and {held} in --include-runs folders" if held else ""
        progress(f"{there} of {len(plan)} runs are already in {runs_file}{others}; {len(todo)} to run")
    position = {task.key: index for index, task in enumerate(plan, 1)}

    def head(task: Task) -> str:
        return f"[{position[task.key]}/{len(plan)}] {task.label} K={task.k_shot} seed={task.seed} {task.method}"

    def announced(tasks: list[Task]) -> Iterable[Task]:  # the serial executor takes a task as it starts it
        for task in tasks:
            progress(head(task))
            yield task

    if executor == "ray":
        progress(f"{len(todo)} runs as Ray tasks on {ray_address or 'a local Ray cluster'}")
        results = ray_executor(todo, run_one, ray_address, cpus_per_run or 1)
    else:
        results = serial_executor(announced(todo), run_one)
    started, finished = time.perf_counter(), 0
    for task, row in results:
        rows.append(row)
        with runs_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        finished += 1
        elapsed = time.perf_counter() - started
        left = f", about {_duration(elapsed / finished * (len(todo) - finished))} left" if finished < len(todo) else ""
        # serial runs were announced as they started; Ray's end in any order, so each line says which run it was
        lead = f"{head(task)}: " if executor == "ray" else "    "
        if "error" in row:
            progress(f"{lead}FAILED, {row['error'][:300]}  ({finished}/{len(todo)} done in {_duration(elapsed)}{left})")
            continue
        if row["non_finite_scores"] or row["non_finite_maps"]:
            progress(
                f"    {task.method} gave non-finite scores on {row['non_finite_scores']} and non-finite maps on "
                f"{row['non_finite_maps']} test images: AUROC recorded as NaN"
            )
        rates = row["threshold"]
        progress(
            f"{lead}image AUROC {row['image_AUROC']:.3f}  false rejects {rates['false_reject_rate']:.1%}  "
            f"detected {rates['detection_rate']:.1%}  train {row['train_s']:.1f}s  peak RSS "
            f"{row['peak_rss_mb']:.0f} MiB  ({finished}/{len(todo)} done in {_duration(elapsed)}{left})"
        )
    return rows


def _layers_of(model: Any) -> list[str] | None:  # noqa: ANN401
    layers = getattr(getattr(model, "model", None), "layers", None)
    return [str(layer) for layer in layers] if isinstance(layers, list | tuple) else None


def _duration(seconds: float) -> str:
    """``seconds`` as '40 s', '12 min' or '2 h 05 min'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def run_one(task: Task) -> dict[str, Any]:
    """Train and test one run in this process and return its row."""
    dataset, category, k_shot, seed, method = task.key
    datamodule, method_config, false_reject_rate = task.build_datamodule(), task.method_config, task.false_reject_rate
    seed_everything(seed, verbose=False)
    few_shot = FewShot(datamodule, k_shot=k_shot, seed=seed)
    if method_config is not None:
        model = method_config.build(false_reject_rate)
    else:
        model = build_method(method, task.backbone, task.image_size, task.fsc_args, false_reject_rate, task.pre_trained)
    with tempfile.TemporaryDirectory(prefix="fsad-bench-") as workdir:
        engine = Engine(
            default_root_dir=workdir,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=task.accelerator,
            devices=1,
            callbacks=[*method_callbacks(method), counter := NonFiniteScoreCounter()],
            **(method_config.trainer_args if method_config is not None else {}),
        )
        start = time.perf_counter()
        engine.fit(model=model, datamodule=few_shot)
        train_s = time.perf_counter() - start
        metrics = engine.test(model=model, datamodule=few_shot, verbose=False)[0]
        threshold = threshold_record(model.post_processor, false_reject_rate)
        # the held-out normal scores and bounds behind it, to study the estimator offline without rerunning
        calibration = dict(getattr(model.post_processor, "calibration", {}) or {})
        # the threshold confirmed on `confirm` further pool normals, and what it does on the same test scores; then
        # the model grown by them, tested again
        confirmed = (
            confirmation_record(model, few_shot, task.confirm, seed, false_reject_rate) if task.confirm else None
        )
        grown = growth_record(model, few_shot, engine, task.confirm, seed, false_reject_rate) if task.grow else None
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
        if "pixel_AUROC" in metrics
        else None,
        "non_finite_scores": counter.scores,
        "non_finite_maps": counter.maps,
        "train_s": train_s,
        "test_normal": test_normal,
        "test_anomalous": test_anomalous,
        "support_set": few_shot.support_set,
        "model_args": task.fsc_args if method in FSC_VARIANTS else method_config.spec if method_config else {},
        # the feature layers a stock or configured model read (FewShotContrastive's are in self_configuration)
        "layers": None if method in FSC_VARIANTS else _layers_of(model),
        "threshold": threshold,
        "calibration": calibration,
    }
    if confirmed is not None:
        row["confirmed"] = confirmed
    if grown is not None:
        row["grown"] = grown
    record = getattr(model, "self_configuration", None)
    if record:  # FewShotContrastive: what it chose from the K normals, and the fine-tuning decision's evidence
        decision = {k: v for k, v in record.get("fine_tuning", {}).items() if k != "families"}
        row["self_configuration"] = {"chosen": record.get("chosen"), "fine_tuning": decision or None}
    if task.time_inference:
        model.eval()
        device = next(model.parameters()).device
        row["ms_b1"] = time_forward(model, 1, task.image_size, device=device)
        row["ms_b32"] = time_forward(model, 32, task.image_size, repeats=2, device=device)
    row["peak_rss_mb"] = peak_rss_mb()
    return row
