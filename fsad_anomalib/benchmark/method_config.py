"""Any anomalib model as a benchmark method: ``--method-config NAME=FILE``.

``FILE`` is a config ``anomalib train --config FILE`` reads (its ``model:`` section: ``class_path`` and
``init_args``), or a file holding ``class_path`` and ``init_args`` alone. The model is built by jsonargparse, the
parser of anomalib's own CLI, so every model the anomalib CLI accepts works here, with the same short names
(``Dfm``, ``Padim``, ``EfficientAd``, ...), plugin models included. It is trained and tested on the benchmark's
support sets with the built-in methods' post-processing and metrics: its threshold is set from the K normals
where the model can be refitted (memory-bank models), its scores keep their order, and anomalib's AUROC is
computed in one pass over the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomalib.models import AnomalibModule
from lightning import LightningModule, Trainer

from fsad_anomalib.benchmark.cli import build_from_spec, read_yaml
from fsad_anomalib.benchmark.methods import OrderPreservingPostProcessor, ranking_components
from fsad_anomalib.models import FewShotContrastive  # noqa: F401 - registers the short name with anomalib's parser
from fsad_anomalib.post_processing.evidence import can_refit

__all__ = ["TRAINER_KEYS", "MethodConfig", "RankingOnlyPostProcessor"]

# what a method config's trainer section may set for its runs (how long it trains); the rest is the benchmark's
TRAINER_KEYS = ("max_epochs", "max_steps")


class RankingOnlyPostProcessor(OrderPreservingPostProcessor):
    """The benchmark's order-preserving post-processor for a model that cannot be refitted: no threshold.

    Models trained by an optimiser (EfficientAd, ...) have no cheap refit for leave-one-out, so no normal-only
    threshold is set; their scores are kept in order for AUROC and the threshold record is NaN.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Accept any model: nothing is refitted."""
        del trainer, pl_module
        self._images, self._snapshot, self._calibrated = {}, None, True

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """No copy of the model is needed."""

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """No training images are kept."""


class MethodConfig:
    """The model of one ``--method-config NAME=FILE``; :meth:`build` makes a fresh one (one per run).

    Reading the file checks it at once: a file that cannot be read, is not YAML, has no model, names a class
    that is not an anomalib model, or gives it arguments it does not take raises a ``ValueError`` that names the
    file, before any run starts.

    Attributes:
        name: The method's name in ``runs.jsonl``, the tables and ``--compare``.
        path: The file.
        spec: Its ``class_path`` and ``init_args``.
        notes: What the benchmark does differently from ``anomalib train`` with this file.
        trainer_args: ``max_epochs`` / ``max_steps`` from its ``trainer:`` section, for models that train by an
            optimiser (Lightning's default is 1,000 epochs); memory-bank models set their own single epoch.
    """

    def __init__(self, name: str, path: str | Path) -> None:
        self.name = name
        self.path = Path(path)
        self.spec, self.notes = self._read_spec()
        model = self.build()  # checks the class and its arguments now, not mid-benchmark
        if not can_refit(model):
            self.notes.append(
                f"{type(model).__name__} is trained by an optimiser and cannot be refitted on K - 1 "
                "images: no normal-only threshold, AUROC only"
            )

    def _error(self, what: str) -> ValueError:
        return ValueError(f"--method-config {self.name}={self.path}: {what}")

    def _read_spec(self) -> tuple[dict[str, Any], list[str]]:
        spec = read_yaml(self.path, self._error)
        notes = []
        self.trainer_args: dict[str, int] = {}
        if isinstance(spec, dict) and "model" in spec:
            trainer = spec.get("trainer") if isinstance(spec.get("trainer"), dict) else {}
            for key in TRAINER_KEYS:
                value = trainer.get(key)
                if value is not None:
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                        msg = f"trainer.{key} must be a whole number of at least 1, got {value!r}."
                        raise self._error(msg)
                    self.trainer_args[key] = value
            ignored = sorted(key for key in spec if key not in {"model", "trainer"})
            ignored += sorted(f"trainer.{key}" for key in trainer if key not in TRAINER_KEYS)
            if ignored:
                notes.append(
                    f"only its model section and trainer.{'/'.join(TRAINER_KEYS)} are read "
                    f"({', '.join(ignored)} "
                    "ignored: the benchmark gives the data, the devices and the post-processing)"
                )
            spec = spec["model"]
        if not isinstance(spec, dict) or "class_path" not in spec:
            msg = (
                "expected an anomalib model: a 'model:' section with 'class_path' and 'init_args', as "
                "`anomalib train --config` reads it, or those two keys at the top of the file."
            )
            raise self._error(msg)
        spec = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
        replaced = sorted(key for key in ("post_processor", "evaluator", "visualizer") if key in spec["init_args"])
        if replaced:
            notes.append(f"{', '.join(replaced)} replaced by the benchmark's (the same for every method)")
            for key in replaced:
                spec["init_args"].pop(key)
        return spec, notes

    def build(self, false_reject_rate: float = 0.05) -> AnomalibModule:
        """A new model from the file, with the benchmark's post-processor and evaluator and no visualizer."""
        model = build_from_spec(AnomalibModule, self.spec, "model", self._error)
        components = ranking_components(false_reject_rate)
        if not can_refit(model):
            components["post_processor"] = RankingOnlyPostProcessor(false_reject_rate)
        model.post_processor = components["post_processor"]
        model.evaluator = components["evaluator"]
        model.visualizer = None
        return model
