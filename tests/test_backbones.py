"""Every backbone family users bring (random weights): default layers by stride, train, score, detect, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from fsad_anomalib.backbones.layers import default_layers, feature_layout
from fsad_anomalib.data import FewShot
from fsad_anomalib.models import FewShotContrastive

from .conftest import STATIC_ONNX, auroc, cpu_engine, folder_datamodule

IMAGE_SIZE = 64

# backbone -> (default patch layers, global layer): the stride-8 and stride-16 stages and the last one, or the ViT's
# blocks at half and three quarters of its depth and the last one
FAMILIES = {
    "resnet18": ([2, 3], 4),
    "convnext_nano": ([1, 2], 3),
    "efficientnet_b0": ([2, 3], 4),
    "mobilenetv3_small_100": ([2, 3], 4),
    "vit_small_patch14_dinov2": ([5, 8], 11),
}


VITS = ("vit_small_patch14_dinov2",)


@pytest.mark.parametrize(("backbone", "expected"), FAMILIES.items())
def test_default_layers_follow_the_stride(backbone: str, expected: tuple) -> None:
    layers, global_layer = default_layers(backbone)
    assert (layers, global_layer) == expected
    layout = feature_layout(backbone)
    if layout.patch_size == 1:
        assert [layout.strides[i] for i in layers] == [8, 16]


def test_a_layer_the_backbone_lacks_is_refused_with_the_list() -> None:
    with pytest.raises(ValueError, match=r"\[4\]: backbone 'convnext_nano' has no such feature layer; it has 0 "):
        FewShotContrastive(backbone="convnext_nano", pre_trained=False, global_layer=4)
    with pytest.raises(ValueError, match=r"blocks\.11, stride 14"):
        FewShotContrastive(backbone="vit_small_patch14_dinov2", pre_trained=False, layers=[12])


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, generated_root, tmp_path_factory):
    """The default model on each backbone (random weights), trained on K = 4 generated normals, and its ONNX file."""
    seed_everything(0)
    root = tmp_path_factory.mktemp(request.param)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    # the defaults but for the length of fine-tuning (3 steps, always on: the fine-tuned backbone is what exports)
    model = FewShotContrastive(
        backbone=request.param, pre_trained=False, image_size=IMAGE_SIZE, fine_tuning={"steps": 3}, visualizer=False
    )
    engine = cpu_engine(root)
    engine.fit(model=model, datamodule=datamodule)
    model.eval()
    test = datamodule.test_data
    images = torch.stack([test[i].image for i in range(len(test))])
    labels = torch.tensor([int(test[i].gt_label) for i in range(len(test))])
    with torch.no_grad():
        raw = model.model(model.pre_processor.transform(images)).pred_score
        eager = model(images)
    # a CNN exports at the test images' size, batch 1 (a static graph traces in about half the time; the default
    # backbone's dynamic graph runs in test_readme_workflow); the ViT as users export it: batch, height, width dynamic
    static = {} if request.param in VITS else {"input_size": tuple(images.shape[-2:]), "onnx_kwargs": STATIC_ONNX}
    onnx = engine.export(model=model, export_type="onnx", export_root=root / "onnx", **static)
    return {
        "backbone": request.param,
        "model": model,
        "engine": engine,
        "root": root,
        "images": images,
        "labels": labels,
        "raw": raw,
        "eager": eager,
        "onnx": onnx,
    }


def test_the_default_trains_scores_and_detects(trained) -> None:
    model, raw, labels = trained["model"], trained["raw"], trained["labels"]
    expected = FAMILIES[trained["backbone"]]
    assert (model.model.layers, model.model.global_layer) == expected
    assert (model.hparams["layers"], model.hparams["global_layer"]) == expected
    assert torch.isfinite(raw).all() and raw.std() > 0
    assert auroc(raw[labels == 0], raw[labels == 1]) > 0.6, f"{trained['backbone']}: no better than chance"
    size = model.image_size  # a ViT's: snapped to a multiple of its patch size
    assert size == (70 if feature_layout(trained["backbone"]).patch_size == 14 else IMAGE_SIZE)
    assert trained["eager"].anomaly_map.shape[-2:] == (size, size)
    assert torch.isfinite(trained["eager"].anomaly_map).all()


def test_onnx_matches_eager(trained) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(trained["onnx"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    eager = trained["eager"].pred_score.flatten().numpy()
    for index in range(3):
        image = trained["images"][index : index + 1]
        out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: image.numpy()}), strict=True))
        np.testing.assert_allclose(out["pred_score"].ravel(), eager[index : index + 1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trained", ["vit_small_patch14_dinov2"], indirect=True)
def test_a_vit_matches_eager_in_openvino(trained, tmp_path, monkeypatch) -> None:
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)  # anomalib's OpenVINOInferencer writes ./openvino_cache
    size = tuple(trained["images"].shape[-2:])  # one image at a time, the size of the dynamic ONNX test above
    path = trained["engine"].export(
        model=trained["model"],
        export_type="openvino",
        export_root=trained["root"] / "ov",
        input_size=size,
        onnx_kwargs=STATIC_ONNX,
    )
    inferencer = OpenVINOInferencer(path=path, device="CPU")
    eager = trained["eager"].pred_score.flatten().numpy()
    for index in range(3):
        result = inferencer.predict(trained["images"][index])
        np.testing.assert_allclose(
            np.asarray(result.pred_score).ravel(), eager[index : index + 1], rtol=1e-4, atol=1e-6
        )


def test_weights_saved_for_an_air_gapped_machine_load_back(tmp_path, monkeypatch, capsys) -> None:
    """``python -m fsad_anomalib.backbones --save NAME --to FOLDER``, the hub stood in for by random weights: the
    printed ``local-dir:`` name is a backbone that loads exactly those weights, without network access.
    """
    import timm

    from fsad_anomalib.backbones.__main__ import main

    real, fetched = timm.create_model, {}

    def hub(name, **kwargs):
        fetched[name] = real(name, **{**kwargs, "pretrained": False})
        return fetched[name]

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python -m fsad_anomalib.backbones --save"))
    argv = command.split()[3:]  # the README's: --save NAME --to FOLDER, run in a fresh folder
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(timm, "create_model", hub)
        assert main(argv) == 0
    name = capsys.readouterr().out.strip().splitlines()[-1]
    assert name == f"local-dir:{tmp_path / argv[3] / argv[1]}"
    model = FewShotContrastive(backbone=name, image_size=IMAGE_SIZE, visualizer=False)  # pretrained: from the folder
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    source = fetched[argv[1]].state_dict()
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)

    with pytest.raises(SystemExit):  # offline (HF_HUB_OFFLINE=1 in the tests): a clear error, last
        main(argv)
    assert "pretrained weights could not be fetched" in capsys.readouterr().err


def test_the_benchmarks_backbone_floor_times_a_vit() -> None:
    """The benchmark's bare-backbone time on a ViT: whole network, image size snapped to the patch size."""
    from fsad_anomalib.benchmark.runner import backbone_floor

    floor = backbone_floor("vit_small_patch14_dinov2", IMAGE_SIZE, repeats=1)
    assert floor["ms_b1"] > 0 and floor["ms_b32"] > 0
