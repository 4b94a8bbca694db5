"""Where the benchmark's runs execute: each in a process of its own, here (serial) or as Ray tasks (ray).

A run is a picklable :class:`Task`: the set's datamodule builder, K, seed, method and the settings every run
shares. :func:`execute` trains and tests it with the runner's function and returns its row; an exception becomes an
error row (the run's
key, ``error`` and the end of the traceback), so a failed run never stops a sweep.

- ``serial``: one run after another in this process. PatchCore's coreset fragments glibc's heap: after each run
  the freed heap is given back to the operating system (``malloc_trim``), so a sweep needs what one run needs.
- ``ray``: every run is a Ray task (``max_calls=1``: a worker process per run), with one GPU where the cluster
  has GPUs, else ``cpus_per_run`` CPUs. The driver alone writes ``runs.jsonl``.

Each run seeds itself (``seed_everything``) and sets torch's thread count to ``cpus_per_run``, so its row is the
same on either executor, timings aside.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fsad_anomalib.benchmark.cli import quiet_logs

__all__ = ["EXECUTORS", "Task", "error_row", "execute", "ray_executor", "serial_executor", "trim_heap"]

EXECUTORS = ("serial", "ray")


@dataclass(frozen=True)
class Task:
    """One run: a set (its datamodule builder), K, seed and method, and the settings every run shares."""

    label: str
    build_datamodule: Callable[[], Any]
    k_shot: int
    seed: int
    method: str
    backbone: str
    image_size: int
    fsc_args: dict[str, Any] = field(default_factory=dict)
    time_inference: bool = True
    accelerator: str = "auto"
    false_reject_rate: float = 0.05
    pre_trained: bool = True
    method_config: Any = None  # a MethodConfig for a --method-config method
    cpus_per_run: int | None = None
    confirm: int = 0  # confirm the threshold on this many further pool normals (0: not)
    grow: bool = False  # then grow the model by them and test it again

    @property
    def key(self) -> tuple:
        """(dataset, category, K, seed, method): the run's key in ``runs.jsonl``."""
        dataset, _, category = self.label.partition("/")
        return (dataset, category, self.k_shot, self.seed, self.method)


def error_row(task: Task, error: BaseException | str) -> dict[str, Any]:
    """The row of a run that failed: its key, the error and the end of its traceback."""
    dataset, category, k_shot, seed, method = task.key
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
        trace = "".join(traceback.format_exception(error))[-2000:]
    else:
        text, trace = str(error), ""
    return {
        "dataset": dataset,
        "category": category,
        "k_shot": k_shot,
        "seed": seed,
        "method": method,
        "error": text,
        "traceback": trace,
    }


def trim_heap() -> None:
    """Give freed heap back to the OS (anomalib's k-center-greedy coreset in PatchCore fragments glibc's heap)."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def execute(task: Task, run: Callable[[Task], dict[str, Any]]) -> dict[str, Any]:
    """``run(task)``'s row, or the task's error row where anything in it raises."""
    quiet_logs()  # a Ray worker starts with Lightning's default logging
    if task.cpus_per_run:
        torch.set_num_threads(task.cpus_per_run)
    try:
        return run(task)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, and the sweep goes on
        return error_row(task, exc)


def serial_executor(
    tasks: Iterable[Task], run: Callable[[Task], dict[str, Any]]
) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Run ``tasks`` one after another in this process; yield each with its row as it ends.

    After each run the freed heap goes back to the operating system (:func:`trim_heap`), so a long sweep needs
    about what its largest run needs.
    """
    for task in tasks:
        row = execute(task, run)
        trim_heap()
        yield task, row


def ray_executor(
    tasks: Iterable[Task], run: Callable[[Task], dict[str, Any]], address: str | None = None, cpus_per_run: int = 1
) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Run ``tasks`` as Ray tasks; yield each with its row as it ends.

    On the cluster at ``address`` (a new local one without it), in the order they end.

    Each task asks for one GPU where the cluster has GPUs, else ``cpus_per_run`` CPUs, and runs in a worker
    process of its own (``max_calls=1``). A task whose worker dies is recorded as failed (no retry).
    """
    try:
        import ray
    except ImportError as exc:
        msg = "--executor ray needs Ray: pip install 'fsad-anomalib[distributed]'."
        raise RuntimeError(msg) from exc
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            num_cpus=None if address else max(cpus_per_run, os.cpu_count() or 1),
        )
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus_per_run}
        remote = ray.remote(max_calls=1, max_retries=0, **options)(execute)
        pending = {remote.remote(task, run): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            try:
                row = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - the worker died or Ray failed the task: record it, go on
                row = error_row(task, exc)
            yield task, row
    finally:
        if started:
            ray.shutdown()
