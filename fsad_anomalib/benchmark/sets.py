"""The data sets a benchmark runs on: the named ones (``--sets``) and anomalib datamodule configs (``--data``).

``--data FILE`` takes the datamodule of a config file as ``anomalib train --config FILE`` reads it (its
``data:`` section, ``class_path`` and ``init_args``), or a file holding ``class_path`` and ``init_args`` alone.
The datamodule is built by jsonargparse, the parser of anomalib's own CLI, so every datamodule the anomalib CLI
accepts works here, with the same short names (``Folder``, ``MVTecAD``, ``Visa``, ``ELPV``, ...). A ``FewShot``
wrapper is unwrapped: the benchmark draws its own support sets for every ``--k`` and ``--seeds``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anomalib.data import Folder, MVTecAD, Visa
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.utils import ValSplitMode

from fsad_anomalib.benchmark.cli import build_from_spec, read_yaml
from fsad_anomalib.data import ELPV, FewShot, Textile
from fsad_anomalib.data.few_shot import normal_pool

__all__ = ["DataConfig", "builtin_datamodule", "test_label_counts"]

SETS_HELP = "ELPV/mono, ELPV/poly, Textile/local, MVTecAD/<category>, Visa/<category>, Folder/<root>"


def test_label_counts(datamodule: AnomalibDataModule) -> tuple[int, int]:
    """How many normal and anomalous images a set-up datamodule's test split holds."""
    counts = datamodule.test_data.samples.label_index.value_counts()
    return int(counts.get(0, 0)), int(counts.get(1, 0))


def builtin_datamodule(label: str, args: argparse.Namespace) -> AnomalibDataModule:
    """The datamodule of a ``--sets`` label, without a validation split (the test set is scored once, whole).

    An unknown set or category, or ``--evaluation dev`` on a set without a development set, is a ``ValueError``.
    """
    dataset, _, category = label.partition("/")
    if dataset == "ELPV":
        return ELPV(
            category or "mono", eval_batch_size=args.eval_batch_size, evaluation=args.evaluation, val_split_mode="none"
        )
    if dataset == "Textile":
        return Textile(
            category or "local", eval_batch_size=args.eval_batch_size, evaluation=args.evaluation, val_split_mode="none"
        )
    if args.evaluation != "test":
        msg = f"--evaluation {args.evaluation}: only the offline sets (ELPV, Textile) have a development set."
        raise ValueError(msg)
    if dataset == "MVTecAD":
        return MVTecAD(
            root=args.mvtec_root,
            category=category,
            eval_batch_size=args.eval_batch_size,
            num_workers=0,
            val_split_mode="none",
        )
    if dataset == "Visa":
        return Visa(
            root=args.visa_root,
            category=category,
            eval_batch_size=args.eval_batch_size,
            num_workers=0,
            val_split_mode="none",
        )
    if dataset == "Folder":
        return Folder(
            name="folder",
            root=category,
            normal_dir="train/good",
            abnormal_dir="test/bad",
            normal_test_dir="test/good",
            val_split_mode="none",
            num_workers=0,
            eval_batch_size=args.eval_batch_size,
        )
    msg = f"--sets: unknown set '{label}'. Use {SETS_HELP}, or --data with an anomalib datamodule config."
    raise ValueError(msg)


class DataConfig:
    """The datamodule of one ``--data`` file; calling it builds a fresh one (one per run).

    Reading the file checks it at once: a file that cannot be read, is not YAML, has no datamodule, names a
    class that is not an anomalib datamodule, gives it arguments it does not take, or a datamodule that cannot
    list its images (a folder that does not exist) or whose test set lacks normal or anomalous images raises a
    ``ValueError`` that names the file. The validation split is set to none, as for every ``--sets`` set: each
    method is scored once on the whole test set, and a split taken from the test set would score half of it.

    Attributes:
        path: The file.
        label: ``<class name>/<category or name>``, e.g. ``Folder/my_product`` or ``MVTecAD/bottle``: the set's
            name in ``runs.jsonl``, the tables and ``--set-model-args``.
        notes: What the benchmark does differently from ``anomalib train`` with this file.
        pool: How many normal training images the support sets are drawn from (the largest K it allows).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.spec, self.notes = self._read_spec()
        datamodule, notes = self._build()  # checks the class, its arguments and its images now, not mid-benchmark
        self.notes += notes
        try:
            datamodule.prepare_data()  # anomalib's datamodules download a missing public set here, as in a run
            datamodule.setup()
        except (OSError, ValueError, RuntimeError) as exc:
            msg = f"its datamodule ({type(datamodule).__name__}) could not list its images: {exc}"
            raise self._error(msg) from exc
        normal, anomalous = test_label_counts(datamodule)
        if not (normal and anomalous):
            msg = (
                f"its test set holds {normal} normal and {anomalous} anomalous images; image AUROC needs both "
                "(for Folder: normal_test_dir and abnormal_dir)."
            )
            raise self._error(msg)
        self.pool = len(normal_pool(datamodule.train_data))
        self.label = f"{type(datamodule).__name__}/{datamodule.category or datamodule.name}"

    def _error(self, what: str) -> ValueError:
        return ValueError(f"--data {self.path}: {what}")

    def _read_spec(self) -> tuple[dict[str, Any], list[str]]:
        spec = read_yaml(self.path, self._error)
        notes = []
        if isinstance(spec, dict) and "data" in spec:
            ignored = sorted(key for key in spec if key != "data")
            if ignored:
                notes.append(
                    f"only its data section is read ({', '.join(ignored)} ignored: FewShotContrastive's "
                    "arguments come from --model-args)"
                )
            spec = spec["data"]
        if not isinstance(spec, dict) or "class_path" not in spec:
            msg = (
                "expected an anomalib datamodule: a 'data:' section with 'class_path' and 'init_args', as "
                "`anomalib train --config` reads it, or those two keys at the top of the file."
            )
            raise self._error(msg)
        return spec, notes

    def __call__(self) -> AnomalibDataModule:
        """A new datamodule from the file, unwrapped from ``FewShot`` and without a validation split."""
        return self._build()[0]

    def _build(self) -> tuple[AnomalibDataModule, list[str]]:

        datamodule = build_from_spec(AnomalibDataModule, self.spec, "datamodule", self._error)
        notes = []
        if isinstance(datamodule, FewShot):
            notes.append(
                f"FewShot's k_shot and seed are left aside: --k and --seeds draw the support sets of "
                f"{type(datamodule.datamodule).__name__}"
            )
            datamodule = datamodule.datamodule
        if datamodule.val_split_mode != ValSplitMode.NONE:
            notes.append(
                f"val_split_mode {datamodule.val_split_mode.value} -> none: every method is scored once on "
                "the whole test set"
            )
            datamodule.val_split_mode = ValSplitMode.NONE
        return datamodule, notes
