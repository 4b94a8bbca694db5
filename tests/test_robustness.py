"""Bad input gets a clear error naming the file or argument; odd but valid input is handled."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from PIL import Image

from fsad_anomalib.data import FewShot
from fsad_anomalib.data.validation import ImageFileError, check_image_file
from fsad_anomalib.models import FewShotContrastive, NotFittedError

from .conftest import cpu_engine, folder_datamodule, make_dataset


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", n_train=6, n_test=4, size=64)


@pytest.mark.parametrize("kind", ["zero_byte", "not_an_image", "truncated", "sixteen_bit"])
def test_bad_image_files_are_named(kind, dataset):
    target = dataset / "test" / "good" / "001.png"
    if kind == "zero_byte":
        target.write_bytes(b"")
        expected = "empty"
    elif kind == "not_an_image":
        target.write_text("this is a log file, not a picture")
        expected = "not a readable image"
    elif kind == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        expected = "not a readable image"
    else:
        cv2.imwrite(str(target), (np.random.default_rng(0).random((64, 64)) * 65535).astype(np.uint16))
        expected = "16-bit"
    with pytest.raises(ImageFileError, match=expected) as info:
        FewShot(folder_datamodule(dataset), k_shot=2).setup()
    assert str(target) in str(info.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_grayscale_rgba_palette_images_are_handled(mode, dataset, tmp_path):
    for path in (dataset / "train" / "good").glob("*.png"):
        Image.open(path).convert(mode).save(path)
    check_image_file(next((dataset / "train" / "good").glob("*.png")))
    seed_everything(0)
    module = FewShot(folder_datamodule(dataset), k_shot=2)
    model = FewShotContrastive(image_size=64, fine_tuning=False, n_views=2)
    cpu_engine(tmp_path / "run").fit(model=model, datamodule=module)
    assert bool(model.model.is_fitted)


def test_tiny_and_large_images_are_resized(dataset, tmp_path):
    seed_everything(0)
    model = FewShotContrastive(image_size=64, fine_tuning=False, n_views=2)
    cpu_engine(tmp_path / "run").fit(model=model, datamodule=FewShot(folder_datamodule(dataset), k_shot=2))
    model.eval()
    with torch.no_grad():
        for size in ((5, 7), (1500, 900)):
            out = model(torch.rand(1, 3, *size))
            assert torch.isfinite(out.pred_score).all()
            assert out.anomaly_map.shape[-2:] == (64, 64)


def test_wrong_tensor_shapes_and_unfitted_model():
    model = FewShotContrastive(image_size=64)
    with pytest.raises(NotFittedError, match="never fitted"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"RGB images of shape \(B, 3, H, W\)"):
        model.model.features(torch.rand(1, 1, 64, 64))
    with pytest.raises(NotFittedError, match="never fitted"):
        model.to_onnx(export_root="unused")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fine_tuning": {"steps": 0}}, "steps must be an integer >= 1"),
        ({"fine_tuning": {"batch_size": 0}}, "batch_size must be an integer >= 1"),
        ({"n_views": 0}, "n_views"),
        ({"fine_tuning": {"lr_backbone": 0.0}}, "lr_backbone"),
        ({"fine_tuning": {"synthesis": "glitter"}}, "synthesis must be one of"),
        ({"fine_tuning": {"temperature": 0.0}}, "temperature"),
        ({"fine_tuning": {"lambda_pp": -1.0}}, "lambda"),
        ({"n_views": 0}, "n_views must be an integer >= 1"),
        ({"score_mode": "bogus"}, "score_mode must be one of"),
        ({"fine_tuning": {"crop_scale": 0.0}}, "crop_scale"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FewShotContrastive(image_size=64, **kwargs)


def test_weights_that_do_not_fit_the_backbone(tmp_path):
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000}))
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(folder / "model.safetensors"))
    with pytest.raises((ValueError, RuntimeError), match="weights"):
        FewShotContrastive(backbone=f"local-dir:{folder}", image_size=64)


def test_checkpoint_from_another_configuration(dataset, tmp_path):
    seed_everything(0)
    module = FewShot(folder_datamodule(dataset), k_shot=2)
    model = FewShotContrastive(image_size=64, fine_tuning=False, n_views=2)
    engine = cpu_engine(tmp_path / "run")
    engine.fit(model=model, datamodule=module)
    ckpt = engine.trainer.checkpoint_callback.best_model_path
    other = FewShotContrastive(image_size=64, layers=[3], fine_tuning=False)
    with pytest.raises(ValueError, match=r"another configuration \(layers"):
        cpu_engine(tmp_path / "other").test(model=other, datamodule=module, ckpt_path=ckpt)


def test_identical_images_give_finite_non_constant_scores(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=4, n_test=4, size=64)
    train = sorted((root / "train" / "good").glob("*.png"))
    for path in train[1:]:
        shutil.copy(train[0], path)
    seed_everything(0)
    model = FewShotContrastive(image_size=64, fine_tuning={"steps": 2}, n_views=2)
    cpu_engine(tmp_path / "run").fit(model=model, datamodule=FewShot(folder_datamodule(root), k_shot=4))
    model.eval()
    with torch.no_grad():
        out = model.model(torch.rand(6, 3, 64, 64))
    assert torch.isfinite(out.pred_score).all() and torch.isfinite(out.anomaly_map).all()
    assert out.pred_score.std() > 0
    assert torch.all(torch.linalg.eigvalsh(model.model.patch_precision.double()) > 0)


def test_user_data_is_not_modified_and_runs_are_versioned(dataset, tmp_path):
    def digest() -> dict[str, str]:
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dataset.rglob("*")) if p.is_file()}

    before = digest()
    for _ in range(2):
        seed_everything(0)
        model = FewShotContrastive(image_size=64, fine_tuning={"steps": 1}, n_views=2)
        cpu_engine(tmp_path / "results").fit(model=model, datamodule=FewShot(folder_datamodule(dataset), k_shot=2))
    assert digest() == before
    runs = sorted((tmp_path / "results").rglob("support_set.json"))
    assert len(runs) == 2 and runs[0].parent != runs[1].parent  # second run did not overwrite the first
