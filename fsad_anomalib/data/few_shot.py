"""K-shot training sets over any anomalib image datamodule."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from jsonargparse.typing import PositiveInt
from lightning import Trainer

from fsad_anomalib.data.validation import check_image_files

logger = logging.getLogger(__name__)

__all__ = ["FewShot", "load_support_set", "normal_pool", "sample_support_set", "skip_validation_without_data"]


def skip_validation_without_data(trainer: Trainer) -> bool:
    """Switch the trainer's validation off where its datamodule has no validation set; say whether it did.

    An anomalib datamodule built with ``val_split_mode="none"`` has no ``val_data``, yet its ``val_dataloader`` is
    defined, so Lightning asks it for one and anomalib fails with ``AttributeError: ... no attribute 'val_data'``.
    Models that need no validation (a threshold from the normals alone) call this from their ``setup("fit")``.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or getattr(datamodule, "val_data", None) is not None or trainer.limit_val_batches == 0:
        return False
    trainer.limit_val_batches = 0
    logger.info(
        "%s has no validation set (val_split_mode none): training runs without a validation pass.",
        type(datamodule).__name__,
    )
    return True


def normal_pool(dataset: AnomalibDataset) -> list[str]:
    """Paths of a training split's normal images: the pool K-shot support sets are drawn from."""
    samples = dataset.samples
    return [str(p) for p in samples.loc[samples.label_index == 0, "image_path"]]


def sample_support_set(pool: list[str], k_shot: int | None, seed: int) -> list[str]:
    """Draw ``k_shot`` distinct paths from ``pool`` with ``seed``.

    ``None``: all of them; the draw is independent of the pool's order.
    """
    if k_shot is not None and (not isinstance(k_shot, int) or isinstance(k_shot, bool) or k_shot < 1):
        msg = f"k_shot must be an integer >= 1, or None for every normal training image, got {k_shot!r}."
        raise ValueError(msg)
    if not pool:
        msg = "The pool of normal training images is empty: the datamodule's training split has no normal image."
        raise ValueError(msg)
    if k_shot is None:
        return sorted(pool)
    if k_shot > len(pool):
        msg = f"k_shot={k_shot} is larger than the pool of normal training images, which holds {len(pool)}."
        raise ValueError(msg)
    ordered = sorted(pool)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ordered), size=k_shot, replace=False)
    return [ordered[i] for i in sorted(chosen)]


def load_support_set(path: str | Path) -> list[str]:
    """Read a support list: a JSON file written by :class:`FewShot` or a text file with one path per line."""
    path = Path(path)
    if not path.is_file():
        msg = f"support_list: file '{path}' does not exist."
        raise FileNotFoundError(msg)
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"support_list: '{path}' is not valid JSON ({exc})."
            raise ValueError(msg) from exc
        paths = data["image_paths"] if isinstance(data, dict) else data
    else:
        paths = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not paths or not all(isinstance(p, str) for p in paths):
        msg = f"support_list: '{path}' holds no image paths."
        raise ValueError(msg)
    return paths


def _path_matcher(pool: list[str]):  # noqa: ANN202
    """A function from a listed path to the pool image it names, or None.

    Exact and resolved paths match first. A list written on another machine (another install prefix or
    dataset root) matches by its trailing path components: the longest tail, at least the file and its
    folder, that names exactly one pool image.
    """
    known = set(pool)
    resolved = {str(Path(p).resolve()): p for p in pool}
    tails: dict[tuple[str, ...], list[str]] = {}
    for p in pool:
        parts = Path(p).parts
        for n in range(2, len(parts) + 1):
            tails.setdefault(parts[-n:], []).append(p)

    def match(path: str) -> str | None:
        if path in known:
            return path
        if str(Path(path).resolve()) in resolved:
            return resolved[str(Path(path).resolve())]
        parts = Path(path).parts
        for n in range(len(parts), 1, -1):
            candidates = tails.get(parts[-n:])
            if candidates:
                return candidates[0] if len(candidates) == 1 else None
        return None

    return match


class FewShot(AnomalibDataModule):
    """Keep only ``k_shot`` normal training images of a wrapped anomalib datamodule.

    Validation and test sets of the wrapped datamodule are left as they are; ``name`` and ``category``
    pass through, so results land where anomalib would put them for the wrapped dataset. The support set
    (paths, seed, K) is written as ``support_set.json`` into the trainer's results folder, and a
    published support set can be reproduced with ``support_list``.

    Args:
        datamodule (AnomalibDataModule): Any anomalib image datamodule (MVTecAD, Visa, Folder, ELPV, Textile, ...).
        k_shot (int | None): Number of normal training images to keep, ``>= 1``; ``None`` keeps every one (your own
            product's ``train/good``: the images you have are the support set). Defaults to ``4``.
        seed (int): Seed of the draw; the same seed and pool always give the same support set. Defaults to ``0``.
        support_list (str | Path | None): A JSON file written by a previous run, or a text file with one image
            path per line. Paths must belong to the wrapped datamodule's normal training pool. Overrides
            ``k_shot`` and ``seed``. Defaults to ``None``.
        train_batch_size (int | None): Batch size of the training loader; ``None`` puts the whole support set in
            one batch. Defaults to ``None``.
        check_images (bool): Open every support and evaluation image once at set-up, so a corrupt, empty,
            truncated or 16-bit file fails with its name (instead of deep inside a data loader). Defaults to
            ``True``.

    Example:
        >>> from anomalib.data import MVTecAD
        >>> from fsad_anomalib.data import FewShot
        >>> datamodule = FewShot(MVTecAD(category="bottle"), k_shot=4, seed=0)
        >>> datamodule.setup()  # doctest: +SKIP
        >>> len(datamodule.train_data)  # doctest: +SKIP
        4
    """

    def __init__(
        self,
        datamodule: AnomalibDataModule,
        k_shot: PositiveInt | None = 4,
        seed: int = 0,
        support_list: str | None = None,
        train_batch_size: int | None = None,
        check_images: bool = True,
    ) -> None:
        if not isinstance(datamodule, AnomalibDataModule):
            msg = f"datamodule must be an anomalib AnomalibDataModule, got {type(datamodule).__name__}."
            raise TypeError(msg)
        if (
            support_list is None
            and k_shot is not None
            and (not isinstance(k_shot, int) or isinstance(k_shot, bool) or k_shot < 1)
        ):
            msg = f"k_shot must be an integer >= 1, or None for every normal training image, got {k_shot!r}."
            raise ValueError(msg)
        super().__init__(
            train_batch_size=train_batch_size or datamodule.train_batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            train_augmentations=datamodule.train_augmentations,
            val_augmentations=datamodule.val_augmentations,
            test_augmentations=datamodule.test_augmentations,
            seed=seed,
        )
        self.datamodule = datamodule
        self.k_shot = k_shot
        self.support_list = support_list
        self._batch_size_given = train_batch_size is not None
        self.support_set: list[str] = []
        self.check_images = check_images

    @property
    def name(self) -> str:
        """Name of the wrapped datamodule."""
        return self.datamodule.name

    @property
    def category(self) -> str:
        """Category of the wrapped datamodule."""
        return self.datamodule.category

    @category.setter
    def category(self, category: str) -> None:
        self.datamodule.category = category

    def _setup(self, _stage: str | None = None) -> None:  # pragma: no cover - setup() is overridden
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Set up the wrapped datamodule, then keep K normals of its training split."""
        if not self._is_setup:
            self.datamodule.setup(stage)
            self.train_data = self.datamodule.train_data
            self.test_data = self.datamodule.test_data
            if hasattr(self.datamodule, "val_data"):
                self.val_data = self.datamodule.val_data
            self.train_data = self._select(self.train_data)
            if self.check_images:
                check_image_files(self.support_set, f"support set of {self.name}/{self.category}")
                for split in ("test_data", "val_data"):
                    dataset = getattr(self, split, None)
                    if dataset is not None:
                        paths = dataset.samples.image_path.astype(str).tolist()
                        check_image_files(paths, f"{split.removesuffix('_data')} set of {self.name}/{self.category}")
            self._is_setup = True
        self._update_augmentations()
        self.save_support_set()

    def val_dataloader(self):  # noqa: ANN201
        """The wrapped datamodule's validation data; none (no validation pass) with ``val_split_mode="none"``."""
        if getattr(self, "val_data", None) is None:
            return []
        return super().val_dataloader()

    def pool(self, dataset: AnomalibDataset | None = None) -> list[str]:
        """Paths of the normal images of the wrapped training split (the pool K images are drawn from)."""
        return normal_pool(dataset if dataset is not None else self.datamodule.train_data)

    def _select(self, train_data: AnomalibDataset) -> AnomalibDataset:
        pool = self.pool(train_data)
        if self.support_list is not None:
            wanted = load_support_set(self.support_list)
            match = _path_matcher(pool)
            chosen = []
            missing = []
            for path in wanted:
                found = match(path)
                if found is None:
                    missing.append(path)
                else:
                    chosen.append(found)
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                msg = (
                    f"support_list '{self.support_list}' names {len(missing)} image(s) that are not in the pool of "
                    f"{len(pool)} normal training images of {self.name}/{self.category}: {shown}"
                )
                raise ValueError(msg)
            if len(set(chosen)) != len(chosen):
                msg = f"support_list '{self.support_list}' names an image more than once."
                raise ValueError(msg)
            self.support_set = sorted(chosen)
            drawn = f"listed in {self.support_list}"
        else:
            try:
                self.support_set = sample_support_set(pool, self.k_shot, self.seed or 0)
            except ValueError as exc:
                msg = f"FewShot over {self.name}/{self.category}: {exc}"
                raise ValueError(msg) from exc
            drawn = "all of them" if self.k_shot is None else f"drawn with seed {self.seed}"
        self.k_shot = len(self.support_set)
        keep = set(self.support_set)
        paths = train_data.samples.image_path.astype(str)
        indices = [i for i, p in enumerate(paths) if p in keep and train_data.samples.label_index.iloc[i] == 0]
        subset = train_data.subsample(indices)
        if len(subset) != self.k_shot:  # duplicate paths in the wrapped dataset
            msg = f"FewShot: expected {self.k_shot} training images after selection, got {len(subset)}."
            raise RuntimeError(msg)
        if not self._batch_size_given:
            self.train_batch_size = max(1, min(self.datamodule.train_batch_size, self.k_shot))
        where = f"{self.name}/{self.category}" if self.category else self.name
        logger.info(
            "FewShot: the model is fitted on %d of the %d normal training images of %s (%s).",
            self.k_shot,
            len(pool),
            where,
            drawn,
        )
        return subset

    def support_record(self) -> dict:
        """The support set as a JSON-serialisable record."""
        return {
            "dataset": self.name,
            "category": self.category,
            "k_shot": self.k_shot,
            "seed": self.seed,
            "support_list": self.support_list,
            "image_paths": self.support_set,
        }

    def save_support_set(self, path: str | Path | None = None) -> Path | None:
        """Write the support set as JSON (default: ``support_set.json`` in the trainer's results folder)."""
        if path is None:
            trainer = getattr(self, "trainer", None)
            if trainer is None or not self.support_set:
                return None
            path = Path(trainer.default_root_dir) / "support_set.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.support_record(), indent=2))
        return path
