"""Real industrial image sets that ship inside PyPI packages, as anomalib datamodules.

* :class:`ELPV` - electroluminescence images of solar cells from ``elpv-dataset``
  (CC BY-NC-SA 4.0; the images stay inside that package and are never copied here).
* :class:`Textile` - simulated textile textures from ``conformal-clip-data`` (MIT).

Both define a **pool** of normal training images and a **fixed test set** (``n_test_normal``
normals plus ``n_test_abnormal`` anomalies, drawn once with ``split_seed``) that never overlaps
the pool. Few-shot training sets are drawn from the pool with :class:`fsad_anomalib.data.FewShot`.

``evaluation="dev"`` swaps the test set for a **development set** made only of images the test set
never uses: ``n_dev`` normals taken off the pool and up to ``n_dev`` of the anomalies left out of the
test set. Choose a method's settings there, then report on the test set.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
from anomalib import TaskType
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from pandas import DataFrame
from torchvision.transforms.v2 import Transform

EVALUATION_SETS = ("test", "dev")

__all__ = ["ELPV", "EVALUATION_SETS", "SamplesDataset", "Textile", "elpv_paths", "split_samples", "textile_paths"]


class SamplesDataset(AnomalibDataset):
    """An anomalib dataset over a ready ``samples`` frame (image_path, label, label_index, mask_path, split)."""

    def __init__(
        self,
        samples: DataFrame,
        name: str,
        category: str,
        task: TaskType = TaskType.CLASSIFICATION,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self._name = name
        self.category = category
        samples = samples.reset_index(drop=True)
        samples.attrs["task"] = TaskType(task).value
        self.samples = samples

    @property
    def name(self) -> str:
        """Dataset name, as given."""
        return self._name


def _require(module: str, pip_name: str, dataset: str):  # noqa: ANN202
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        msg = (
            f"The {dataset} datamodule needs the package '{pip_name}', which is not installed. "
            f"Install it with: pip install {pip_name}  (or: pip install 'fsad-anomalib[offline]')."
        )
        raise ImportError(msg) from exc


def split_samples(
    normal_paths: list[str],
    abnormal_paths: list[str],
    what: str,
    n_test_normal: int = 150,
    n_test_abnormal: int = 150,
    split_seed: int = 0,
    evaluation: str = "test",
    n_dev: int = 100,
) -> DataFrame:
    """Sorted, seeded, fixed split: test normals + test anomalies, the remaining normals form the pool.

    ``what`` names the set in error messages (``"ELPV mono"``).

    With ``evaluation="dev"`` the rows marked test are the development set instead: the last ``n_dev``
    normals of the pool and up to ``n_dev`` anomalies outside the test set; the pool loses those normals.
    """
    if evaluation not in EVALUATION_SETS:
        msg = f"{what}: evaluation must be one of {EVALUATION_SETS}, got '{evaluation}'."
        raise ValueError(msg)
    normal_paths = sorted(normal_paths)
    abnormal_paths = sorted(abnormal_paths)
    if n_test_normal >= len(normal_paths):
        msg = f"{what}: n_test_normal={n_test_normal} leaves no training pool ({len(normal_paths)} normal images)."
        raise ValueError(msg)
    if n_test_abnormal > len(abnormal_paths) or n_test_abnormal < 1:
        msg = f"{what}: n_test_abnormal must be in 1..{len(abnormal_paths)}, got {n_test_abnormal}."
        raise ValueError(msg)
    rng = np.random.default_rng(split_seed)
    normal_order = rng.permutation(len(normal_paths))
    abnormal_order = rng.permutation(len(abnormal_paths))
    test_normal = [normal_paths[i] for i in normal_order[:n_test_normal]]
    pool = [normal_paths[i] for i in normal_order[n_test_normal:]]
    test_abnormal = [abnormal_paths[i] for i in abnormal_order[:n_test_abnormal]]
    if evaluation == "dev":
        spare = [abnormal_paths[i] for i in abnormal_order[n_test_abnormal:]]
        if n_dev < 1 or n_dev >= len(pool) or not spare:
            msg = (
                f"{what}: the development set needs 1 <= n_dev < {len(pool)} (pool size) and anomalies outside "
                f"the test set ({len(spare)} left); got n_dev={n_dev}."
            )
            raise ValueError(msg)
        test_normal, pool = pool[-n_dev:], pool[:-n_dev]
        test_abnormal = spare[:n_dev]
    rows = [(p, "normal", 0, "", Split.TRAIN.value) for p in pool]
    rows += [(p, "normal", 0, "", Split.TEST.value) for p in test_normal]
    rows += [(p, "abnormal", 1, "", Split.TEST.value) for p in test_abnormal]
    return DataFrame(rows, columns=["image_path", "label", "label_index", "mask_path", "split"])


def elpv_paths(category: str) -> tuple[list[str], list[str]]:
    """Normal and anomalous images of one ELPV cell type: defect probability 0 and 1 (1/3 and 2/3 left out)."""
    _require("elpv_dataset", "elpv-dataset", "ELPV")
    if category not in ELPV.CATEGORIES:
        msg = f"ELPV category must be one of {ELPV.CATEGORIES}, got '{category}'."
        raise ValueError(msg)
    labels = Path(importlib.import_module("elpv_dataset").__file__).parent / "data" / "labels.csv"
    data = np.genfromtxt(labels, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    root = labels.parent
    paths = [str(root / p) for p in np.char.decode(data["path"])]
    probs = data["probability"]
    types = np.char.decode(data["type"])
    normal = [p for p, pr, t in zip(paths, probs, types, strict=True) if t == category and pr == 0.0]  # noqa: RUF069 - the package's exact labels
    abnormal = [p for p, pr, t in zip(paths, probs, types, strict=True) if t == category and pr == 1.0]  # noqa: RUF069 - the package's exact labels
    return normal, abnormal


def textile_paths(category: str = "local") -> tuple[list[str], list[str]]:
    """Nominal images and ``local`` (small defects) or ``global`` (texture shift) images of the textile set."""
    ccd = _require("conformal_clip_data", "conformal-clip-data", "Textile")
    if category not in Textile.CATEGORIES:
        msg = f"Textile category must be one of {Textile.CATEGORIES}, got '{category}'."
        raise ValueError(msg)
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    normal = [str(p) for p in Path(ccd.nominal_dir()).iterdir() if p.suffix.lower() in exts]
    abnormal_dir = ccd.local_dir() if category == "local" else ccd.global_dir()
    abnormal = [str(p) for p in Path(abnormal_dir).iterdir() if p.suffix.lower() in exts]
    return normal, abnormal


class _OfflineDataModule(AnomalibDataModule):
    CATEGORIES: tuple[str, ...] = ()
    DATASET_NAME = ""

    def __init__(
        self,
        category: str,
        n_test_normal: int = 150,
        n_test_abnormal: int = 150,
        split_seed: int = 0,
        evaluation: str = "test",
        n_dev: int = 100,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            test_split_mode=TestSplitMode.FROM_DIR,
            seed=seed,
        )
        if category not in self.CATEGORIES:
            msg = f"{self.DATASET_NAME} category must be one of {self.CATEGORIES}, got '{category}'."
            raise ValueError(msg)
        self.category = category
        self.n_test_normal = n_test_normal
        self.n_test_abnormal = n_test_abnormal
        self.split_seed = split_seed
        if evaluation not in EVALUATION_SETS:
            msg = f"{self.DATASET_NAME}: evaluation must be one of {EVALUATION_SETS}, got '{evaluation}'."
            raise ValueError(msg)
        self.evaluation = evaluation
        self.n_dev = n_dev

    def _paths(self) -> tuple[list[str], list[str]]:
        """Normal and anomalous image paths of ``self.category``."""
        raise NotImplementedError

    def _samples_frame(self) -> DataFrame:
        return split_samples(
            *self._paths(),
            f"{self.DATASET_NAME} {self.category}",
            n_test_normal=self.n_test_normal,
            n_test_abnormal=self.n_test_abnormal,
            split_seed=self.split_seed,
            evaluation=self.evaluation,
            n_dev=self.n_dev,
        )

    def _setup(self, _stage: str | None = None) -> None:
        samples = self._samples_frame()
        train = samples[samples.split == Split.TRAIN.value]
        test = samples[samples.split == Split.TEST.value]
        self.train_data = SamplesDataset(train, self.DATASET_NAME, self.category)
        self.test_data = SamplesDataset(test, self.DATASET_NAME, self.category)

    @property
    def name(self) -> str:
        """Dataset name used in the results path."""
        return self.DATASET_NAME


class ELPV(_OfflineDataModule):
    """ELPV solar cells (``elpv-dataset``), category ``mono`` or ``poly``, 300x300 grayscale read as RGB.

    Normals: defect probability 0; anomalies: probability 1 (1/3 and 2/3 are left out). With the defaults
    the test set holds 150 normal and 150 anomalous cells and the pool the remaining normals
    (mono: 588 normals -> pool 438; poly: 920 normals -> pool 770). No pixel masks. ``evaluation="dev"``:
    100 pool normals and 100 anomalies the test set leaves out (mono has 313, poly 402) form a development set.

    Args:
        category (str): ``mono`` or ``poly``. Defaults to ``"mono"``.
        **kwargs: Split sizes, ``evaluation`` (``test`` or ``dev``), batch sizes and anomalib's split modes.

    Example:
        >>> from fsad_anomalib.data import ELPV, FewShot
        >>> datamodule = FewShot(ELPV("poly"), k_shot=8, seed=1)
        >>> ELPV("mono", evaluation="dev").evaluation
        'dev'
    """

    CATEGORIES = ("mono", "poly")
    DATASET_NAME = "ELPV"

    def __init__(self, category: str = "mono", **kwargs) -> None:
        super().__init__(category=category, **kwargs)

    def _paths(self) -> tuple[list[str], list[str]]:
        return elpv_paths(self.category)


class Textile(_OfflineDataModule):
    """Simulated textile textures (``conformal-clip-data``), category ``local`` (default) or ``global``.

    1,000 nominal images; 500 with small local defects, 500 with a global texture shift. With the
    defaults the test set holds 150 nominal and 150 defective images and the pool 850 nominals. No masks.
    ``evaluation="dev"``: 100 pool nominals and 100 defective images outside the test set.

    Args:
        category (str): ``local`` or ``global``. Defaults to ``"local"``.
        **kwargs: Split sizes, ``evaluation`` (``test`` or ``dev``), batch sizes and anomalib's split modes.

    Example:
        >>> from fsad_anomalib.data import FewShot, Textile
        >>> datamodule = FewShot(Textile("local"), k_shot=4, seed=0)
        >>> Textile().category
        'local'
    """

    CATEGORIES = ("local", "global")
    DATASET_NAME = "Textile"

    def __init__(self, category: str = "local", **kwargs) -> None:
        super().__init__(category=category, **kwargs)

    def _paths(self) -> tuple[list[str], list[str]]:
        return textile_paths(self.category)
