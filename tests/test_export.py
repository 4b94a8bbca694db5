"""Export to torch, ONNX and OpenVINO gives the eager model's scores, labels and maps.

The model trains with no validation split: its OK/NG threshold comes from the K normals alone
(NormalThresholdPostProcessor, the default), and the exported graphs carry it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from fsad_anomalib.data import FewShot
from fsad_anomalib.models import FewShotContrastive

from .conftest import cpu_engine, folder_datamodule

IMAGE_SIZE = 96


@pytest.fixture(scope="module")
def trained(generated_root, tmp_path_factory):
    seed_everything(0)
    root = tmp_path_factory.mktemp("export")
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    model = FewShotContrastive(image_size=IMAGE_SIZE, fine_tuning={"steps": 3}, n_views=4)
    engine = cpu_engine(root)
    engine.fit(model=model, datamodule=datamodule)
    model.eval()
    images = torch.stack([datamodule.test_data[i].image for i in range(len(datamodule.test_data))])
    with torch.no_grad():
        eager = model(images)
    return {"model": model, "engine": engine, "root": root, "images": images, "eager": eager}


@pytest.fixture(scope="module")
def exported(trained):
    """One export of each kind, shared by the tests below."""
    export = trained["engine"].export
    return {
        kind: export(model=trained["model"], export_type=kind, export_root=trained["root"] / kind)
        for kind in ("onnx", "openvino", "torch")
    }


def test_the_normal_only_threshold_labels_the_test_images(trained):
    """No validation set: the threshold is finite and separates the generated test images (so that the label
    comparisons below compare decisions, not a constant).
    """
    post = trained["model"].post_processor
    assert torch.isfinite(post.image_threshold) and torch.isfinite(post.pixel_threshold)
    labels = trained["eager"].pred_label.flatten()
    assert 0 < int(labels.sum()) < labels.numel()
    # normalised score 0.5 at the threshold: label <=> score above 0.5
    assert torch.equal(labels.bool(), trained["eager"].pred_score.flatten() > 0.5)


def test_onnx_runtime_matches_eager(trained, exported):
    import onnxruntime as ort

    path = exported["onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    eager = trained["eager"]
    for index in range(trained["images"].shape[0]):  # batch 1, as deployed
        out = dict(
            zip(
                names,
                session.run(None, {session.get_inputs()[0].name: trained["images"][index : index + 1].numpy()}),
                strict=True,
            )
        )
        np.testing.assert_allclose(out["pred_score"], eager.pred_score[index : index + 1].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            out["anomaly_map"], eager.anomaly_map[index : index + 1].numpy(), rtol=1e-3, atol=1e-4
        )
        if abs(eager.pred_score[index].item() - 0.5) > 1e-4:  # a score on the threshold may flip within tolerance
            assert bool(out["pred_label"].item()) == bool(eager.pred_label[index].item())


def test_openvino_matches_eager(trained, exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anomalib's OpenVINOInferencer writes ./openvino_cache
    from anomalib.deploy import OpenVINOInferencer

    path = exported["openvino"]
    # OpenVINO's defaults (bf16 on CPUs with bf16 units, unless the IR says otherwise, as ours does)
    inferencer = OpenVINOInferencer(path=path, device="CPU")
    eager = trained["eager"]
    for index in range(1, 4):
        result = inferencer.predict(trained["images"][index])
        np.testing.assert_allclose(
            np.asarray(result.pred_score).ravel(), eager.pred_score[index : index + 1].numpy(), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(result.anomaly_map).reshape(-1),
            eager.anomaly_map[index].numpy().reshape(-1),
            rtol=1e-3,
            atol=1e-4,
        )
        if abs(eager.pred_score[index].item() - 0.5) > 1e-4:
            assert bool(np.asarray(result.pred_label).item()) == bool(eager.pred_label[index].item())
    labels = [bool(np.asarray(inferencer.predict(image).pred_label).item()) for image in trained["images"]]
    agree = [
        a == bool(b)
        for a, b, s in zip(labels, eager.pred_label.flatten(), eager.pred_score.flatten(), strict=True)
        if abs(s.item() - 0.5) > 1e-4
    ]
    assert all(agree) and len(agree) >= len(labels) - 1


def test_onnx_accepts_other_image_sizes(exported):
    import onnxruntime as ort

    path = exported["onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((64, 80), (200, 150)):
        image = torch.rand(2, 3, *size).numpy()
        outputs = session.run(None, {session.get_inputs()[0].name: image})
        assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")


def test_inferencers_run_on_a_folder_of_mixed_sizes(exported, tmp_path, monkeypatch):
    import cv2
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer

    folder = tmp_path / "line_camera"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, size in enumerate([(96, 96), (120, 80), (300, 200)]):
        cv2.imwrite(str(folder / f"{index}.png"), (rng.random((*size, 3)) * 255).astype(np.uint8))
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the file was written by this test
    monkeypatch.chdir(tmp_path)  # anomalib's OpenVINOInferencer writes ./openvino_cache
    torch_path, ov_path = exported["torch"], exported["openvino"]
    torch_inferencer = TorchInferencer(path=torch_path, device="cpu")
    ov_inferencer = OpenVINOInferencer(path=ov_path, device="CPU")
    files = sorted(folder.glob("*.png"))
    for path in files:
        a = torch_inferencer.predict(path)
        b = ov_inferencer.predict(path)
        assert np.isfinite(float(a.pred_score)) and np.isfinite(float(np.asarray(b.pred_score).ravel()[0]))
        np.testing.assert_allclose(np.asarray(b.pred_score).ravel()[0], float(a.pred_score), rtol=1e-3)
