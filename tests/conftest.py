"""Shared fixtures: a generated dataset with visible defects and known masks, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLED", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (and its subprocesses): workers share the cores
    os.environ["OMP_NUM_THREADS"] = "1"

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import Folder
from anomalib.engine import Engine
from kornia.enhance import adjust_brightness
from sklearn.metrics import roc_auc_score

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
# exports of stock models (PatchCore, PaDiM) trace without a Python stack per graph node, as FewShotContrastive's do
torch.fx.config.do_not_emit_stack_traces = True

# The files that take longest (minutes each), longest first. pytest-xdist hands whole files to its two workers in
# collection order; a long file handed out last would leave the other worker idle while it runs.
SLOWEST_FILES = (
    "test_readme_workflow.py",
    "test_threshold.py",
    "test_benchmark_generality.py",
    "test_backbones.py",
    "test_cli_configs.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the slowest files first; the other files, and the tests within each file, keep their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """Image AUROC of anomalous against normal scores (scikit-learn)."""
    scores = torch.cat([normal.flatten(), anomalous.flatten()]).double().numpy()
    return float(roc_auc_score([0] * normal.numel() + [1] * anomalous.numel(), scores))


def unseen_shift(image: torch.Tensor, turn: int) -> torch.Tensor:
    """A whole-image change of a kind the self-check never makes, by turn: brighter, noisy, lower resolution."""
    if turn % 3 == 0:
        return adjust_brightness(image, 0.12)
    if turn % 3 == 1:
        return (image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(turn))).clamp(0, 1)
    small = F.interpolate(image, scale_factor=1 / 3, mode="area")
    return F.interpolate(small, size=image.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


# anomalib's ONNX export with no dynamic axis (batch 1 at the given input_size): traces in about half the time
STATIC_ONNX = {"dynamic_shapes": None}


def cpu_engine(root: Path, **kwargs) -> Engine:
    """Anomalib's Engine on the CPU, quiet: no logger, no progress bar."""
    return Engine(default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu", **kwargs)


def _normal(rng: np.random.Generator, size: int) -> np.ndarray:
    """A striped texture with noise (a stand-in for a wafer or cell surface)."""
    img = np.full((size, size, 3), 110, np.float32)
    period = max(8, size // 8)
    for x in range(0, size, period):
        img[:, x : x + 2] = 50
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, n_train: int = 12, n_test: int = 8, size: int = 96, seed: int = 0) -> Path:
    """Folder dataset: train/good, test/good, test/bad with bright blobs, mask/bad with their masks."""
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/bad", "mask/bad"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / f"train/good/{i:03d}.png"), _normal(rng, size))
    for i in range(n_test):
        cv2.imwrite(str(root / f"test/good/{i:03d}.png"), _normal(rng, size))
    for i in range(n_test):
        img = _normal(rng, size)
        mask = np.zeros((size, size), np.uint8)
        x, y = (int(v) for v in rng.integers(size // 5, size - size // 5, 2))
        radius = max(4, size // 14)
        cv2.circle(img, (x, y), radius, (245, 245, 245), -1)
        cv2.circle(mask, (x, y), radius, 255, -1)
        cv2.imwrite(str(root / f"test/bad/{i:03d}.png"), img)
        cv2.imwrite(str(root / f"mask/bad/{i:03d}.png"), mask)
    return root


def folder_datamodule(root: Path, **kwargs) -> Folder:
    """Anomalib Folder over a generated dataset, with few-shot-safe split settings."""
    return Folder(
        name="generated",
        root=root,
        normal_dir="train/good",
        abnormal_dir="test/bad",
        normal_test_dir="test/good",
        mask_dir="mask/bad",
        num_workers=0,
        **{"val_split_mode": "same_as_test", **kwargs},
    )


@pytest.fixture(scope="session")
def generated_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated dataset shared by the session (read-only by convention)."""
    return make_dataset(tmp_path_factory.mktemp("generated"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted weights go to a per-session cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "fsad-cache"
    monkeypatch.setenv("FSAD_ANOMALIB_CACHE", str(cache))
